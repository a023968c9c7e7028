"""The door of the service: admission control, read timeouts and memory release.

Everything that keeps the service answering when it is sent more than it can do, or sent it slowly:

- :class:`Door` bounds what is in flight: requests admitted and not yet answered, the bytes of their
  bodies, and the pixels of their images (from the image headers, before anything is decoded). Past a
  bound the request is refused at once (:class:`Busy`: HTTP 503 with ``Retry-After``), never queued
  without limit. ``Retry-After`` is the time the current backlog takes to drain at the service rate
  observed over the last seconds (:class:`RateMeter`), at least one second.
- :class:`AdmissionMiddleware` (pure ASGI) puts the body-carrying requests (POST, PUT, PATCH: ``/detect``
  and any inference route mounted on the same app) through the door *before reading their body*
  (the declared ``Content-Length`` is checked too), then reads the body under a deadline (a client
  that takes longer gets 408 and its connection is closed), and watches the connection while the
  request runs: a client that goes away cancels its request and is counted as a disconnect, not as an
  HTTP status.
- :func:`protocol_with_header_timeout` makes uvicorn's HTTP protocol close connections whose request
  headers do not arrive in time (uvicorn only times out idle keep-alive connections after a response;
  one that sends nothing, or half a header, would stay open for ever).
- :func:`release_memory` hands freed heap memory back to the system (glibc's ``malloc_trim``); the
  middleware calls it when the service falls idle after work.

GET requests (probes, metrics, pages) never wait at the door: they stay fast at any load.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import ctypes
import ctypes.util
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("attn_export.serve")

BODY_METHODS = ("POST", "PUT", "PATCH")
#: scope keys the middleware sets for the layers inside (and outside) it
SCOPE_TICKET = "attn_export.ticket"
SCOPE_DISCONNECTED = "attn_export.disconnected"


class Busy(RuntimeError):
    """The service is at one of its bounds: answer 503 with ``Retry-After``."""

    def __init__(self, reason: str, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.reason = reason  # in_flight, bytes, pixels, queue
        self.message = message
        self.retry_after = retry_after
        self.wait_s: float | None = None  # bytes: the reservations in the way lapse within this many seconds


def shed(busy: Busy, metrics=None) -> dict[str, str]:
    """Count a request shed at a bound (``shed_requests_total`` by reason); the headers of its 503.

    The one place a :class:`Busy` becomes an answer: every protocol renders it in its own form."""
    if metrics is not None:
        metrics.shed.labels(busy.reason).inc()
    return {"Retry-After": str(busy.retry_after)}


class RateMeter:
    """Requests answered per second over the last ``window_s`` seconds (the last ``size`` answers)."""

    def __init__(self, window_s: float = 10.0, size: int = 1024) -> None:
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def record(self, now: float | None = None) -> None:
        with self._lock:
            self._times.append(time.monotonic() if now is None else now)

    def rate(self, now: float | None = None) -> float | None:
        """Answers per second, or None before any answer in the window."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._times and self._times[0] < now - self.window_s:
                self._times.popleft()
            if not self._times:
                return None
            # a burst of answers in a few milliseconds is not a rate: span at least half a second
            span = max(now - self._times[0], 0.5)
            return len(self._times) / span


#: how long a body's declared size is reserved before any of it must arrive (see :class:`Door`)
PROMISE_GRACE_S = 0.25
#: a reservation whose arrival the door cannot watch (a gRPC message being received) is kept this long
UNSEEN_GRACE_S = 1.0
#: the longest a request waits at the door for reservations that are about to lapse
MAX_DOOR_WAIT_S = 2.0

_PRE_ADMITTED: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("attn_export_pre_admitted", default=None)


class Door:
    """Bounds on the requests, body bytes and image pixels in flight (thread-safe).

    The byte budget fills with bytes, not promises. A body's declared ``Content-Length`` is reserved when
    the request is admitted (so a body that is admitted is not refused half-way), but a reservation is
    kept only while the body arrives on pace: within ``grace_s`` of admission and then at least its share
    of the body deadline (``arrived >= declared * (age - grace_s) / pace_s``; ``pace_s`` is the body
    timeout). A reservation that falls behind (a client that sends nothing, or a byte a second) is
    *reclaimed* by the next request or chunk that needs the room: it shrinks to the bytes that arrived,
    and the rest of that body is charged as it arrives (and refused with 503 when the budget is full of
    real bytes). So clients declaring large bodies and sending nothing hold nothing that others need,
    however many they are; clients that really send their bodies are bounded by the budget as before.
    A request that finds the budget held by reservations about to lapse waits for them (at most
    ``MAX_DOOR_WAIT_S``, see :meth:`enter`) instead of being refused.
    """

    def __init__(
        self,
        max_requests: int,
        max_bytes: int,
        max_pixels: int,
        max_retry_after_s: int = 60,
        meter: RateMeter | None = None,
        *,
        pace_s: float = 30.0,
        grace_s: float = PROMISE_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.max_retry_after_s = max_retry_after_s
        self.meter = meter or RateMeter()
        self.pace_s = pace_s
        self.grace_s = grace_s
        self.clock = clock
        self.requests = 0  # admitted, body read, not yet answered
        self.reading = 0  # admitted, body still arriving
        self.bytes = 0  # reserved: the bytes arrived, and the reservations of bodies arriving on pace
        self.pixels = 0
        self.reclaimed = 0  # reservations reclaimed from bodies that fell behind (a counter)
        self._promises: set[Ticket] = set()  # tickets whose reservation runs ahead of their arrived bytes
        self._waiters: list = []  # (loop, future) of the requests waiting at the door for bytes
        self._lock = threading.Lock()

    def retry_after(self, backlog: int | None = None) -> int:
        """Seconds until the backlog (default: the requests in flight) is answered at the observed rate."""
        backlog = self.requests if backlog is None else backlog
        rate = self.meter.rate()
        if rate is None:  # nothing answered lately: busy starting, or stalled
            return 1 if backlog == 0 else min(5, self.max_retry_after_s)
        return int(min(self.max_retry_after_s, max(1, math.ceil(backlog / rate))))

    def _busy(self, reason: str, what: str, wait_s: float | None = None) -> Busy:
        busy = Busy(reason, f"the server is busy: {what}; retry after the time in Retry-After", self.retry_after())
        busy.wait_s = wait_s
        return busy

    # -- reservations (under the lock) ------------------------------------------------------------
    def _lapse_at(self, t: Ticket) -> float:
        """When ``t``'s reservation falls behind if no more of its body arrives."""
        if not t.watched:
            return t.admitted_at + max(self.grace_s, UNSEEN_GRACE_S)
        return t.admitted_at + self.grace_s + self.pace_s * t.arrived / max(t.declared, 1)

    def _make_room(self, need: int, now: float, exclude: Ticket | None = None) -> tuple[bool, float | None]:
        """Whether ``need`` more bytes fit, reclaiming reservations that fell behind (stalest first); else
        (False, seconds until the reservations in the way lapse, or None when waiting would not help)."""
        free = self.max_bytes - self.bytes
        if need <= free or self.bytes == 0 or (exclude is not None and self.bytes == exclude.bytes):
            return True, None  # alone, a request larger than the budget still runs
        ahead = [(self._lapse_at(t), t) for t in self._promises if t is not exclude]
        stale = sorted((at, id(t), t) for at, t in ahead if at <= now)
        if free + sum(t.bytes - t.arrived for _, _, t in stale) >= need:
            taken: list[Ticket] = []
            for _, _, t in stale:
                if self.max_bytes - self.bytes >= need:
                    break
                self.bytes -= t.bytes - t.arrived
                t.bytes = t.arrived
                self._promises.discard(t)
                self.reclaimed += 1
                taken.append(t)
            for t in taken:
                if t.on_reclaim is not None:
                    with contextlib.suppress(Exception):
                        t.on_reclaim()
            return True, None
        # worth waiting for: reservations of bodies that have shown nothing yet (a body arriving holds its own)
        empty = [(at, t) for at, t in ahead if at > now and t.arrived == 0]
        if empty and free + sum(t.bytes - t.arrived for _, _, t in stale) + sum(t.bytes for _, t in empty) >= need:
            return False, max(0.005, min(at for at, _ in empty) - now)
        return False, None

    def admit(self, declared_bytes: int = 0, *, watched: bool = True, on_reclaim=None) -> Ticket:
        """A ticket for one request whose body is about to be read, or :class:`Busy` (nothing read yet).

        While its body arrives a request holds only its bytes (a slow client holds no request place), and
        its declared size only while the body arrives on pace (see the class); :meth:`Ticket.start` takes
        the request place once the body is there. ``watched=False``: the body's arrival cannot be followed
        (a gRPC message): its reservation lapses ``UNSEEN_GRACE_S`` after admission, and then ``on_reclaim``
        is called when it is reclaimed (the caller stops that read). A :class:`Busy` for bytes carries
        ``wait_s`` when reservations in the way lapse within that many seconds (see :meth:`enter`).
        """
        with self._lock:
            if self.requests >= self.max_requests:
                raise self._busy("in_flight", f"{self.requests} requests are in flight (at most {self.max_requests})")
            now = self.clock()
            if declared_bytes:
                fits, wait_s = self._make_room(declared_bytes, now)
                if not fits:
                    raise self._busy(
                        "bytes",
                        f"{self.bytes:,} body bytes are in flight; {declared_bytes:,} more would pass "
                        f"{self.max_bytes:,}",
                        wait_s,
                    )
            ticket = Ticket(self, declared_bytes, now, watched, on_reclaim)
            self.reading += 1
            self.bytes += declared_bytes
            if declared_bytes:
                self._promises.add(ticket)
        return ticket

    async def enter(self, declared_bytes: int = 0, max_wait_s: float = MAX_DOOR_WAIT_S, **kwargs) -> Ticket:
        """:meth:`admit`, waiting (at most ``max_wait_s``) while the bytes in the way are reservations about to
        lapse; :class:`Busy` otherwise."""
        deadline = time.monotonic() + max_wait_s
        while True:
            try:
                return self.admit(declared_bytes, **kwargs)
            except Busy as e:
                if e.wait_s is None or time.monotonic() + e.wait_s > deadline:
                    raise
                await self.changed(e.wait_s)

    async def changed(self, timeout: float) -> None:
        """Return when bytes are given back (a request left, or a message turned out smaller than its
        reservation), or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        entry = (loop, waiter)
        with self._lock:
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    def _wake(self) -> None:
        """Tell the requests waiting at the door (:meth:`changed`) that bytes were given back."""
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            with contextlib.suppress(RuntimeError):  # its loop closed
                loop.call_soon_threadsafe(_set_done, waiter)

    def leave(self, ticket: Ticket, answered: bool, on_idle: Callable[[], None] | None = None) -> None:
        """``ticket``'s request is over: its share is given back, an answer counts in the service rate, and
        ``on_idle`` runs when nothing is left in flight."""
        ticket.release()
        if answered:
            self.meter.record()
        if self.requests == 0 and self.reading == 0 and on_idle is not None:
            on_idle()

    @contextlib.contextmanager
    def pre_admitted(self, ticket: Ticket) -> Iterator[Ticket]:
        """Within the block, :meth:`passage` uses ``ticket`` (admitted before its message was received) instead
        of admitting the message again."""
        token = _PRE_ADMITTED.set(ticket)
        try:
            yield ticket
        finally:
            _PRE_ADMITTED.reset(token)

    @contextlib.contextmanager
    def passage(self, nbytes: int, on_idle: Callable[[], None] | None = None) -> Iterator[Ticket]:
        """Admit a request that arrived whole (a gRPC message of ``nbytes``) and take its place at once;
        :class:`Busy` past a bound. The block's normal end counts as an answer.

        Where the message was admitted before it was received (:meth:`pre_admitted`: ``start_grpc``'s
        interceptor), that ticket is charged the message's size and takes the place; its owner releases it."""
        early = _PRE_ADMITTED.get()
        if early is not None and early.door is self and not early.started and not early.released:
            early.settle(nbytes)
            early.start()
            yield early
            return
        ticket = self.admit(nbytes)
        answered = False
        try:
            ticket.settle(nbytes)  # all there: no reservation ahead of it
            ticket.start()
            yield ticket
            answered = True
        finally:
            self.leave(ticket, answered, on_idle)


def _set_done(waiter) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Ticket:
    """One admitted request's share of the door's bounds; :meth:`release` gives it back (once)."""

    def __init__(self, door: Door, declared: int, admitted_at: float, watched: bool = True, on_reclaim=None) -> None:
        self.door = door
        self.declared = declared
        self.admitted_at = admitted_at
        self.watched = watched
        self.on_reclaim = on_reclaim
        self.arrived = 0  # body bytes (and bytes made from them) held
        self.bytes = declared  # reserved: arrived, or more while a reservation is kept
        self.pixels = 0
        self.started = False
        self.released = False

    @property
    def reclaimed(self) -> bool:
        """The reservation was taken back before the body arrived (its bytes are charged as they come)."""
        return not self.started and self.bytes < self.declared

    def start(self) -> None:
        """The body is read: take a request place (:class:`Busy` when they are all taken meanwhile)."""
        door = self.door
        with door._lock:
            if door.requests >= door.max_requests:
                raise door._busy("in_flight", f"{door.requests} requests are in flight (at most {door.max_requests})")
            door.reading -= 1
            door.requests += 1
            self.started = True
            door._promises.discard(self)

    def _claim(self, n: int, now: float) -> None:
        door = self.door
        fits, wait_s = door._make_room(n, now, exclude=self)
        if not fits:
            raise door._busy("bytes", f"{door.bytes:,} body bytes are in flight (at most {door.max_bytes:,})", wait_s)
        door.bytes += n
        self.bytes += n

    def received(self, n: int) -> None:
        """``n`` body bytes arrived: within the reservation they are already counted; past it (no declared
        length, or a reservation reclaimed) they take room, reclaiming lapsed reservations of others;
        :class:`Busy` (nothing counted) when the budget is full."""
        door = self.door
        with door._lock:
            over = self.arrived + n - self.bytes
            if over > 0:
                self._claim(over, door.clock())
            self.arrived += n

    def add_bytes(self, n: int) -> None:
        """``n`` more bytes held on this request's behalf (a body decompressed); :class:`Busy` past the budget."""
        door = self.door
        with door._lock:
            self._claim(n, door.clock())
            self.arrived += n

    def settle(self, n: int) -> None:
        """The whole body is ``n`` bytes (a gRPC message once received): the reservation becomes ``n``."""
        door = self.door
        with door._lock:
            if n > self.bytes:
                self._claim(n - self.bytes, door.clock())
            else:
                door.bytes -= self.bytes - n
                self.bytes = n
            self.arrived = n
            door._promises.discard(self)
        door._wake()

    def reserve_pixels(self, n: int) -> None:
        """Take ``n`` image pixels (read from the headers, before decoding); :class:`Busy` past the bound.

        A request larger than the whole budget is still taken when nothing else holds pixels: it then
        runs alone (each image is within ``max_pixels``; the images decode one after another).
        """
        door = self.door
        with door._lock:
            if door.pixels + n > door.max_pixels and door.pixels > 0:
                raise door._busy(
                    "pixels",
                    f"{door.pixels / 1e6:.0f} megapixels are being decoded; {n / 1e6:.0f} more would pass "
                    f"{door.max_pixels / 1e6:.0f}",
                )
            door.pixels += n
            self.pixels += n

    def release_pixels(self) -> None:
        door = self.door
        with door._lock:
            door.pixels -= self.pixels
            self.pixels = 0

    def release(self) -> None:
        door = self.door
        with door._lock:
            if self.released:
                return
            self.released = True
            if self.started:
                door.requests -= 1
            else:
                door.reading -= 1
            door._promises.discard(self)
            door.bytes -= self.bytes
            door.pixels -= self.pixels
            self.bytes = self.pixels = 0
        door._wake()


# ------------------------------------------------------------------------------------------ memory
_LIBC: Any = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        name = ctypes.util.find_library("c")
        with contextlib.suppress(OSError, AttributeError):
            lib = ctypes.CDLL(name or "libc.so.6")
            if hasattr(lib, "malloc_trim"):
                _LIBC = lib
    return _LIBC or None


def release_memory() -> bool:
    """Return the heap's free pages to the system (glibc ``malloc_trim``); False where there is none.

    CPython and numpy free their buffers, but glibc keeps freed heap memory in its arenas; after a burst
    of large uploads the process would stay at its peak size for ever.
    """
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)  # ctypes releases the GIL during the call
    return True


# ------------------------------------------------------------------------------------------ ASGI
def scope_header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


#: the most digits of a Content-Length read as a number (more is larger than any body a server takes)
_MAX_LENGTH_DIGITS = 18


def content_length(text: str | None) -> int | None:
    """A ``Content-Length`` header's value: None when absent; :class:`ValueError` (one line) unless it is ASCII
    digits (``'²'.isdigit()`` is True in Python, and ``int()`` of thousands of digits raises). A number of more
    than 18 digits reads as 10**18 (past any limit: 413)."""
    if text is None:
        return None
    value = text.strip(" \t")
    if not value or not (value.isascii() and value.isdigit()):
        shown = value.encode("ascii", "backslashreplace").decode()[:40]
        raise ValueError(f"the Content-Length header must be a decimal number of bytes, not {shown!r}")
    return int(value) if len(value) <= _MAX_LENGTH_DIGITS else 10**_MAX_LENGTH_DIGITS


async def _received(ticket: Ticket, n: int, max_wait_s: float = MAX_DOOR_WAIT_S) -> None:
    """:meth:`Ticket.received`, waiting (at most ``max_wait_s``) while the room is held by reservations about
    to lapse."""
    deadline = time.monotonic() + max_wait_s
    while True:
        try:
            ticket.received(n)
            return
        except Busy as e:
            if e.wait_s is None or time.monotonic() + e.wait_s > deadline:
                raise
            await ticket.door.changed(e.wait_s)


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    import json

    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class AdmissionMiddleware:
    """Pure ASGI: the door, the body (size limit and read deadline) and disconnects of body-carrying requests.

    ``metrics`` is a :class:`~attn_export.serve.metrics.ServeMetrics` (or None). The layers inside find
    the request's :class:`Ticket` in ``scope["attn_export.ticket"]`` (to reserve pixels); the layers
    outside find ``scope["attn_export.disconnected"]`` set when the client went away.
    """

    def __init__(
        self,
        app,
        door: Door,
        max_body_bytes: int,
        body_timeout_s: float,
        metrics=None,
        guarded: Callable[[dict], bool] | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.door = door
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics
        self.guarded = guarded or (lambda scope: scope["method"] in BODY_METHODS)
        self.on_idle = on_idle
        door.pace_s = body_timeout_s  # a declared body's reservation is kept while it arrives within this

    # -- helpers -------------------------------------------------------------------------------
    def _count(self, counter: str, label: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, counter).labels(label).inc()

    def _gauges(self) -> None:
        if self.metrics is not None:
            door = self.door
            self.metrics.admitted.set(door.requests)
            self.metrics.reading.set(door.reading)
            self.metrics.bytes_in_flight.set(door.bytes)
            self.metrics.pixels_in_flight.set(door.pixels)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.guarded(scope):
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        try:
            declared = content_length(scope_header(scope, b"content-length"))
        except ValueError as e:
            self._count("rejected", "bad_request")
            body = {"error": "bad_request", "detail": str(e), "status": 400}
            await _send_json(send, 400, body, {"Connection": "close"})
            return
        if declared is not None and declared > limit:
            await self._too_large(scope, receive, send, declared)
            return
        try:
            ticket = await self.door.enter(declared or 0)
        except Busy as e:
            await self._busy(send, e)
            return
        self._gauges()
        scope[SCOPE_TICKET] = ticket
        answered = False
        try:
            answered = await self._run(scope, receive, send, ticket, declared)
        finally:
            self.door.leave(ticket, answered, self.on_idle)
            self._gauges()

    async def _busy(self, send, e: Busy, **headers: str) -> None:
        body = {"error": "busy", "detail": e.message, "status": 503}
        await _send_json(send, 503, body, shed(e, self.metrics) | headers)

    async def _too_large(self, scope, receive, send, declared: int | None) -> None:
        """413 before parsing; the body is read and dropped up to a cap (so the client sees the answer)."""
        limit = self.max_body_bytes
        cap = max(4 * limit, 64 << 20)
        if declared is None or declared <= cap:
            total, deadline = 0, time.monotonic() + self.body_timeout_s
            while total <= cap:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                if message["type"] == "http.disconnect":
                    scope[SCOPE_DISCONNECTED] = "reading"
                    self._count("disconnects", "reading")
                    return
                total += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        self._count("rejected", "body_size")
        size = f"{declared:,} bytes" if declared is not None else f"over {limit:,} bytes"
        detail = f"the request body is {size}; this server takes at most {limit:,} bytes"
        await _send_json(
            send, 413, {"error": "payload_too_large", "detail": detail, "status": 413}, {"Connection": "close"}
        )

    async def _read_body(self, scope, receive, send, ticket: Ticket, declared: int | None) -> bytes | None:
        """The whole body, or None once an answer was sent or the client left."""
        chunks: list[bytes] = []
        total = 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self._count("rejected", "body_timeout")
                detail = f"the request body did not arrive within {self.body_timeout_s:g} s"
                await _send_json(
                    send, 408, {"error": "request_timeout", "detail": detail, "status": 408}, {"Connection": "close"}
                )
                return None
            if message["type"] == "http.disconnect":
                scope[SCOPE_DISCONNECTED] = "reading"
                self._count("disconnects", "reading")
                return None
            body = message.get("body", b"")
            if body:
                total += len(body)
                if total > self.max_body_bytes:
                    await self._too_large(scope, receive, send, None)
                    return None
                try:  # within the reservation: counted already; past it (reclaimed, or no length) room is taken
                    await _received(ticket, len(body))
                except Busy as e:
                    await self._busy(send, e, Connection="close")
                    return None
                chunks.append(body)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _run(self, scope, receive, send, ticket: Ticket, declared: int | None) -> bool:
        """Read the body, run the app, watch for a disconnect; True when the app answered."""
        body = await self._read_body(scope, receive, send, ticket, declared)
        if body is None:
            return False
        try:
            ticket.start()
        except Busy as e:
            await self._busy(send, e)
            return False
        self._gauges()
        gone = asyncio.Event()
        state = {"body_sent": False, "response_done": False}

        async def replay():
            if not state["body_sent"]:
                state["body_sent"] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # the app asks again only to learn of a disconnect
            return {"type": "http.disconnect"}

        async def send_watched(message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["response_done"] = True
            await send(message)

        app_task = asyncio.ensure_future(self.app(scope, replay, send_watched))

        async def watch() -> None:
            message = await receive()  # after the whole body: returns when the client leaves (or we answered)
            if message["type"] == "http.disconnect" and not state["response_done"]:
                gone.set()
                app_task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await app_task
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            scope[SCOPE_DISCONNECTED] = "waiting"
            self._count("disconnects", "waiting")
            return False
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
        if gone.is_set() and not state["response_done"]:
            scope[SCOPE_DISCONNECTED] = "waiting"
            self._count("disconnects", "waiting")
            return False
        return True


# ------------------------------------------------------------------------------------------ uvicorn
HEADER_TIMEOUT_ENV = "ATTN_EXPORT_HEADER_TIMEOUT_S"
_timeout_hook: Callable[[str], None] | None = None


def set_timeout_hook(hook: Callable[[str], None] | None) -> None:
    """What the protocol classes without a hook of their own call on a header timeout (a worker process's
    app counts it in its metrics)."""
    global _timeout_hook
    _timeout_hook = hook


class _HeaderTimeout:
    """Mixin for uvicorn's HTTP protocols: a request's headers must arrive within ``header_timeout_s``
    of the connection opening (or of the request's first byte, on a kept-alive connection); a connection
    that sends nothing, or part of the headers, is closed then (with 408 when it sent something)."""

    header_timeout_s: float | None = None  # None: from ATTN_EXPORT_HEADER_TIMEOUT_S, else 30
    on_timeout: Callable[[str], None] | None = None  # called with "idle" or "headers"; else the module's hook

    def _timeout(self) -> float:
        if self.header_timeout_s is not None:
            return self.header_timeout_s
        with contextlib.suppress(ValueError):
            return float(os.environ.get(HEADER_TIMEOUT_ENV, "30"))
        return 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._header_bytes = 0
        self._arm_header_timer()

    def _awaiting_headers(self) -> bool:
        cycle = getattr(self, "cycle", None)
        return cycle is None or cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._timeout(), self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        was_waiting = self._awaiting_headers()
        super().data_received(data)
        if self._awaiting_headers():
            self._header_bytes = self._header_bytes + len(data) if was_waiting else len(data)
            self._arm_header_timer()
        else:
            self._header_bytes = 0
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm_header_timer()  # uvicorn's keep-alive timeout takes over until the next byte
        self._header_bytes = 0

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers() or self.transport.is_closing():
            return
        started = self._header_bytes > 0
        hook = self.on_timeout or _timeout_hook
        if hook is not None:
            with contextlib.suppress(Exception):
                hook("headers" if started else "idle")
        if started:
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 30\r\n"
                b"connection: close\r\n\r\nthe request headers timed out"
            )
        self.transport.close()


def protocol_with_header_timeout(
    timeout_s: float | None = None, on_timeout: Callable[[str], None] | None = None, base: type | None = None
) -> type:
    """uvicorn's HTTP protocol class (httptools where installed, else h11) with a header deadline."""
    if base is None:
        try:
            import httptools  # noqa: F401
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        except ImportError:
            from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return type(
        f"HeaderTimeout{base.__name__}",
        (_HeaderTimeout, base),
        {"header_timeout_s": timeout_s, "on_timeout": staticmethod(on_timeout) if on_timeout else None},
    )


def _module_protocol():
    """The class ``uvicorn --http attn_export.serve.door:HeaderTimeoutProtocol`` loads (worker processes):
    the timeout comes from ``ATTN_EXPORT_HEADER_TIMEOUT_S``."""
    return protocol_with_header_timeout()


def __getattr__(name: str):  # lazily: importing this module must not import uvicorn
    if name == "HeaderTimeoutProtocol":
        cls = _module_protocol()
        globals()[name] = cls
        return cls
    raise AttributeError(name)

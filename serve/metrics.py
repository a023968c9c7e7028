"""Prometheus metrics of the service, in a registry of each app's own (several apps can live in one process).

With ``--workers N`` each server process keeps its own counters; a scrape reaches one of them.

``http_requests_total`` and ``http_request_duration_seconds`` are labelled by route template
(``/v2/models/{model}/infer``), ``other`` for paths no route matches. ``internal_errors_total`` counts what
the last guard caught (an unexpected exception: a logged 500, or gRPC INTERNAL): the tests keep it at 0.

What a client received is counted once: ``http_requests_total`` by the status it was sent, or
``client_disconnects_total`` when it left before its answer (never both). Every refusal is also counted
by reason: ``rejected_inputs_total`` for what a client sent wrong (4xx), ``shed_requests_total`` for the
service's own bounds (503). Stage timings separate work (``stage_seconds``) from waiting for a worker
(``wait_seconds``); the backlog shows in the ``admitted_requests``, ``*_in_flight``, ``cpu_pool_backlog``
and ``queue_depth`` gauges.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

NAMESPACE = "attn_export"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class ServeMetrics:
    """The service's counters, histograms and gauges."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        ns = NAMESPACE
        self.requests = Counter(
            "http_requests", "HTTP requests answered, by route and status code (disconnects apart)",
            ["route", "method", "status"], namespace=ns, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "http_request_duration_seconds", "HTTP request latency, by route", ["route"],
            buckets=LATENCY_BUCKETS, namespace=ns, registry=r,
        )  # fmt: skip
        self.internal_errors = Counter(
            "internal_errors", "requests answered 500 / INTERNAL by the last guard (a bug: no client input may "
            "reach it), by route template or gRPC method", ["route"], namespace=ns, registry=r,
        )  # fmt: skip
        self.grpc_requests = Counter(
            "grpc_requests", "gRPC calls answered (with --grpc-port), by method and status code",
            ["method", "code"], namespace=ns, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("http_requests_in_flight", "HTTP requests being answered", namespace=ns, registry=r)
        self.disconnects = Counter(
            "client_disconnects", "requests whose client left before the answer, by stage (reading, waiting)",
            ["stage"], namespace=ns, registry=r,
        )  # fmt: skip
        self.connections_closed = Counter(
            "connections_closed", "connections the server closed, by reason (idle, headers: header timeout)",
            ["reason"], namespace=ns, registry=r,
        )  # fmt: skip
        self.images = Counter("images", "images detected on", namespace=ns, registry=r)
        self.detections = Counter("detections", "detections returned", namespace=ns, registry=r)
        self.rejected = Counter(
            "rejected_inputs", "requests refused for what they sent (4xx), by reason", ["reason"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.shed = Counter(
            "shed_requests", "requests refused at a bound of the service (503), by reason", ["reason"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.admitted = Gauge(
            "admitted_requests", "requests admitted at the door and not yet answered (the backlog)",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.reading = Gauge(
            "reading_requests", "requests admitted whose body is still arriving", namespace=ns, registry=r
        )
        self.bytes_in_flight = Gauge(
            "body_bytes_in_flight", "body bytes of the admitted requests", namespace=ns, registry=r
        )
        self.pixels_in_flight = Gauge(
            "pixels_in_flight", "image pixels (from their headers) of the admitted requests being decoded",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.pool_backlog = Gauge(
            "cpu_pool_backlog", "tasks queued or running on the decode/NMS pool", namespace=ns, registry=r
        )
        self.batch_size = Histogram(
            "batch_size", "images per inference call", buckets=BATCH_BUCKETS, namespace=ns, registry=r
        )
        self.queue_depth = Gauge("queue_depth", "images waiting for inference", namespace=ns, registry=r)
        self.queue_wait = Histogram(
            "queue_wait_seconds", "time an image waits for its batch", buckets=STAGE_BUCKETS, namespace=ns, registry=r
        )
        self.stage = Histogram(
            "stage_seconds", "work per stage: parse, decode (per image), inference (per batch), postprocess",
            ["stage"], buckets=STAGE_BUCKETS, namespace=ns, registry=r,
        )  # fmt: skip
        self.wait = Histogram(
            "wait_seconds", "time a request waits before a stage starts: decode and postprocess (the CPU pool), "
            "inference (the batch queue)", ["stage"], buckets=STAGE_BUCKETS, namespace=ns, registry=r,
        )  # fmt: skip
        self.queue_full = Counter("queue_full", "requests refused because the queue was full", namespace=ns, registry=r)
        self.ready = Gauge("ready", "1 when the model is loaded and warmed up", namespace=ns, registry=r)
        self.model_info = Gauge(
            "model_info", "the model served (always 1)", ["model", "backend", "provider"], namespace=ns, registry=r
        )
        self.memory_releases = Counter(
            "memory_releases", "times freed heap memory was handed back to the system (idle after work)",
            namespace=ns, registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)

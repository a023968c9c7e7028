"""One way to write a file: into a temporary name beside it, renamed into place when complete.

A reader never sees half a file, and a failure (an exception, Ctrl-C) leaves the old file, or none,
behind, never a partial one. Every writer in the package goes through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


def _tmp_name(path: Path, suffix: str) -> Path:
    # pid and thread: two writers of one path (processes or threads) never share a temporary file
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success rename it to ``path``, on error
    remove it. ``suffix`` ends the temporary name, for writers that look at it (``np.savez``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data) -> int:
    """Write ``data`` (bytes or any buffer) to ``path`` atomically; returns the bytes written."""
    view = memoryview(data)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(view)
    return view.nbytes


def write_text(path: str | os.PathLike, text: str) -> int:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the bytes written."""
    return write_bytes(path, text.encode("utf-8"))

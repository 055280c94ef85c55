"""Open file descriptors shared by reading threads, and exact positional reads.

Every reader of weight files (:mod:`safetensors_io`, :mod:`gguf_io`, the expert store) keeps one
read-only descriptor per file (per ``O_DIRECT`` flag) for its lifetime and reads with
``os.preadv``, which releases the GIL and needs no shared file offset, so any thread may read.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from moetier.errors import WeightError


class OpenFiles:
    """``fd(path, direct=False)`` opens each file once (thread-safe); ``close()`` (or garbage
    collection) closes them all."""

    def __init__(self) -> None:
        self._fds: dict[tuple[Path, bool], int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path, direct: bool = False) -> int:
        key = (path, direct)
        fd = self._fds.get(key)
        if fd is None:
            with self._lock:
                fd = self._fds.get(key)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0))
                    self._fds[key] = fd
        return fd

    def pread_exact(self, path: Path, buf: Any, offset: int, what: str) -> None:
        """Fill ``buf`` (a writable byte buffer) from ``path`` at ``offset``; a short file is a
        WeightError naming the file and ``what`` (e.g. ``tensor 'x'``)."""
        fd, done, n = self.fd(path), 0, memoryview(buf).nbytes
        while done < n:
            got = os.preadv(fd, [buf[done:]], offset + done)
            if got <= 0:
                raise WeightError(f"{path}: {what}: file ended early (truncated?)")
            done += got

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

"""Admission control: how much work the server accepts before it spends memory on a request.

A request is counted from admission until it is answered (decoding, queued, computing) and
refused with UNAVAILABLE at once when ``limit`` requests are in flight, before anything of it is
decoded: memory is then bounded by the limit times the largest request, not by the client.
Decoding runs on a pool that refuses work beyond a fixed backlog instead of queueing it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from runtime.serving.errors import ServingError, Status
from runtime.serving.threads import use_one_thread

T = TypeVar("T")


class Admission:
    """Requests in flight, at most ``limit``; the server drains them on shutdown."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be >= 1, got {limit}")
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Count one request for the block; ``ServingError`` UNAVAILABLE when full."""
        with self._lock:
            if self._count >= self.limit:
                raise ServingError(
                    Status.UNAVAILABLE, f"the server is busy ({self.limit} requests in flight); retry later"
                )
            self._count += 1
            self._idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
                if not self._count:
                    self._idle.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is in flight; False if ``timeout`` passed first."""
        return self._idle.wait(timeout)


class BoundedPool:
    """Single-threaded helper workers holding at most ``max_pending`` jobs (queued + running) for
    ``purpose`` (named in the refusal)."""

    def __init__(self, purpose: str, threads: int, max_pending: int) -> None:
        if threads < 1 or max_pending < threads:
            raise ValueError(
                f"{purpose}: need threads >= 1 and a backlog >= threads, got {threads}, {max_pending}"
            )
        self.purpose = purpose
        self.max_pending = max_pending
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pool = ThreadPoolExecutor(
            threads, thread_name_prefix=f"e2vpt-{purpose}", initializer=use_one_thread
        )

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Run ``fn(*args)`` on a worker; ``ServingError`` UNAVAILABLE at once when the backlog is full."""
        if not self._slots.acquire(blocking=False):
            raise ServingError(
                Status.UNAVAILABLE,
                f"the {self.purpose} backlog is full ({self.max_pending} jobs); retry later",
            )
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())  # cancelled jobs free their slot too
        return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

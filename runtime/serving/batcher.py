"""One dynamic batcher for all tasks: requests of different tasks share a batch.

The event loop submits validated, preprocessed requests into a bounded queue; one worker thread
forms batches of up to ``max_batch_size`` rows (a request of N images is N rows and is never
split), waiting at most ``max_queue_delay`` after the oldest request arrived, and runs each batch
under ONE registry snapshot. Versions: a request arrives with the task entry it was admitted
under (held with ``TaskRegistry.hold`` by the caller) and computes with that entry, so a task
replaced or unloaded while the request waits does not change its answer. Requests whose deadline
passed or whose caller cancelled are dropped before compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from prometheus_client import Gauge
from torch import Tensor

from runtime.core.registry import TaskEntry
from runtime.engines.base import InferenceEngine
from runtime.serving.metrics import BatchShare, ServerMetrics
from runtime.serving.threads import use_compute_threads

log = logging.getLogger("e2vpt.batcher")

# An idle worker still wakes this often. On the main thread that matters: a SIGTERM the kernel
# hands to another thread only runs its Python handler once the main thread runs bytecode again.
IDLE_WAKE_SECONDS = 0.5


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue_size`` requests; the caller should retry later."""


class ShuttingDownError(RuntimeError):
    """The batcher no longer accepts requests."""


class DeadlineExpiredError(TimeoutError):
    """The request's deadline passed before its batch ran."""


BATCHING_MODES = ("mixed", "per-task")


@dataclass(frozen=True)
class BatcherConfig:
    """``batching``: ``mixed`` lets any tasks share a batch; ``per-task`` batches one task at a time
    (what a server with one model per task can do, kept for comparison). ``threads``: intra-op
    threads of the worker (default: every available core)."""

    max_batch_size: int = 32
    max_queue_delay: float = 0.005
    max_queue_size: int = 256
    batching: str = "mixed"
    threads: int | None = None
    # Triton's priority levels: 1 is the highest; a request without one (priority 0) takes the
    # default level (0 here: the lowest). 0 levels: one first-come, first-served queue.
    priority_levels: int = 0
    default_priority_level: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_queue_delay < 0:
            raise ValueError(f"invalid batcher settings {self}")
        if self.priority_levels < 0 or not 0 <= self.default_priority_level <= self.priority_levels:
            raise ValueError(
                f"default priority level {self.default_priority_level} "
                f"must be within 0..{self.priority_levels}"
            )
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching {self.batching!r} is not one of {BATCHING_MODES}")

    def level(self, priority: int) -> int:
        """The queue level of a request's ``priority`` (0: the default level)."""
        return priority or self.default_priority_level or self.priority_levels


@dataclass(frozen=True)
class BatchResult:
    """Logits ``[N, C]`` of one request and the task version that produced them."""

    logits: Tensor
    entry: TaskEntry
    queue_ns: int
    batch_rows: int


@dataclass(eq=False)  # identity: the queue removes this very request
class _Request:
    entry: TaskEntry
    images: Tensor
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float | None
    level: int = 0
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)

    @property
    def rows(self) -> int:
        return self.images.shape[0]

    @property
    def task_id(self) -> str:
        return self.entry.task_id


def _settle(future: asyncio.Future, result: BatchResult | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    """Bounded queue plus one computing thread that runs mixed-task batches through ``engine``.

    ``start()`` computes on a worker thread of its own; ``open()`` then ``run()`` computes on the
    caller's thread instead (the server's command line uses its main thread: see runtime/serving/threads.py).
    """

    def __init__(self, engine: InferenceEngine, config: BatcherConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._running = False
        self._finished = threading.Event()
        # Set once the computing thread has warmed the engine up (or the batcher stops first).
        self.warmed = threading.Event()

    def open(self) -> None:
        """Accept requests; batches run once some thread calls ``run()``."""
        self._accepting = True

    def start(self) -> None:
        """Accept requests and run batches on a worker thread."""
        self.open()
        self._running = True
        threading.Thread(target=self.run, name="e2vpt-batcher", daemon=True).start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        return len(self._queue) >= self.config.max_queue_size

    async def infer(
        self, entry: TaskEntry, images: Tensor, deadline: float | None = None, priority: int = 0
    ) -> BatchResult:
        """Queue ``images [N, 3, S, S]`` to run under ``entry`` and await its logits; never blocks the loop.

        ``entry`` must stay held (``TaskRegistry.hold``) until this returns; ``deadline`` is a
        ``time.monotonic()`` instant; ``priority`` a level (1 highest) or 0 for the default one.
        """
        if images.shape[0] > self.config.max_batch_size:
            raise ValueError(
                f"batch of {images.shape[0]} images exceeds max_batch_size {self.config.max_batch_size}"
            )
        loop = asyncio.get_running_loop()
        request = _Request(entry, images, loop.create_future(), loop, deadline, self.config.level(priority))
        with self._cond:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down")
            if len(self._queue) >= self.config.max_queue_size:
                raise QueueFullError(
                    f"queue is full ({self.config.max_queue_size} requests waiting); retry later"
                )
            self._queue.append(request)
            self.metrics.queue_depth.set(len(self._queue))
            self._pending(request).inc()
            self._cond.notify()
        return await request.future

    def stop(self, timeout: float | None = None) -> bool:
        """Refuse new requests, finish the queued ones, stop the worker; False if it outlived ``timeout``."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self.warmed.set()  # nobody waits for a warm-up that will not come
            self._cond.notify_all()
            if not self._running:
                return True
        return self._finished.wait(timeout)

    def _next_batch(self) -> list[_Request] | None:
        """Block until a batch is ready; None once stopping with an empty queue."""
        cfg = self.config
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait(IDLE_WAKE_SECONDS)
            first = self._best(None)
            assert first is not None  # the queue is not empty
            self._queue.remove(first)
            self._pending(first).dec()
            batch = [first]
            rows = batch[0].rows
            close_at = batch[0].enqueued_ns / 1e9 + cfg.max_queue_delay
            while rows < cfg.max_batch_size:
                candidate = self._candidate(batch[0].task_id)
                if candidate is not None:
                    if rows + candidate.rows > cfg.max_batch_size:
                        break
                    self._queue.remove(candidate)
                    self._pending(candidate).dec()
                    batch.append(candidate)
                    rows += candidate.rows
                    continue
                remaining = close_at - time.perf_counter_ns() / 1e9
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            self.metrics.queue_depth.set(len(self._queue))
        return batch

    def _pending(self, request: _Request) -> Gauge:
        return self.metrics.nv_pending.labels(request.task_id, str(request.entry.version))

    def _candidate(self, task_id: str) -> _Request | None:
        """The next queued request that may join a batch opened by ``task_id``."""
        return self._best(None if self.config.batching == "mixed" else task_id)

    def _best(self, task_id: str | None) -> _Request | None:
        """The oldest queued request (of ``task_id``, if given) of the highest priority level."""
        best = None
        for request in self._queue:  # oldest first; the queue is bounded by max_queue_size
            if (task_id is None or request.task_id == task_id) and (
                best is None or request.level < best.level
            ):
                best = request
                if best.level <= 1:
                    break
        return best

    def run(self) -> None:
        """Run batches on this thread until ``stop()``, after the queue has drained."""
        with self._cond:
            self._running = True
        use_compute_threads(self.config.threads)
        self._warm_up()
        try:
            while (batch := self._next_batch()) is not None:
                try:
                    self._execute(batch)
                except Exception as error:  # a failing batch must not kill the worker
                    log.exception("batch of %d requests failed", len(batch))
                    for request in batch:
                        self._resolve(request, None, error)
        finally:
            self._finished.set()

    def _warm_up(self) -> None:
        """On the computing thread: let the engine prepare every batch size (compile, capture graphs)."""
        try:
            self.engine.warm_up(range(1, self.config.max_batch_size + 1))
        except Exception:  # an engine that cannot prepare still computes, eagerly
            log.exception("engine warm-up failed; batches run without it")
        finally:
            self.warmed.set()

    def _resolve(self, request: _Request, result: BatchResult | None, error: BaseException | None) -> None:
        # A closed loop raises RuntimeError: nobody waits for this answer anymore.
        with contextlib.suppress(RuntimeError):
            request.loop.call_soon_threadsafe(_settle, request.future, result, error)

    def _live(self, batch: list[_Request]) -> list[_Request]:
        now = time.monotonic()
        live = []
        for request in batch:
            if request.future.cancelled():
                self.metrics.dropped.labels("cancelled").inc()
            elif request.deadline is not None and now >= request.deadline:
                self.metrics.dropped.labels("deadline").inc()
                self._resolve(request, None, DeadlineExpiredError("deadline passed while queued"))
            else:
                live.append(request)
        return live

    def _execute(self, batch: list[_Request]) -> None:
        batch = self._live(batch)
        if not batch:
            return
        with self.engine.registry.acquire() as snapshot:
            started = time.perf_counter_ns()
            images = torch.cat([request.images for request in batch])
            entries = [request.entry for request in batch for _ in range(request.rows)]
            inputs_ready = time.perf_counter_ns()
            logits = self.engine.forward_entries(snapshot, images, entries)
            inferred = time.perf_counter_ns()
        results = []
        row = 0
        for request in batch:
            rows = logits[row : row + request.rows]
            row += request.rows
            result = BatchResult(
                logits=torch.stack(rows),
                entry=request.entry,
                queue_ns=started - request.enqueued_ns,
                batch_rows=len(entries),
            )
            results.append((request, result))
        finished = time.perf_counter_ns()
        task_rows: dict[tuple[str, str], int] = {}
        task_waits: dict[tuple[str, str], list[int]] = {}
        for request, result in results:
            key = (request.task_id, str(request.entry.version))
            task_rows[key] = task_rows.get(key, 0) + request.rows
            task_waits.setdefault(key, []).append(result.queue_ns)
        self.metrics.record_batch(
            [
                BatchShare(task, version, task_rows[task, version], task_waits[task, version])
                for task, version in task_rows
            ],
            inputs_ready - started,
            inferred - inputs_ready,
            finished - inferred,
        )
        # Statistics first, answers second: a client that got its answer sees it counted.
        for request, result in results:
            self._resolve(request, result, None)

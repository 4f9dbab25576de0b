"""Which registered tasks are resident: a tiered cache over the registry's tables.

Tiers: the engine's tables (resident: a batch can run it) -> host memory (compiled, written back
without reading or compiling its package) -> the package in the repository. With a budget
(``max_resident_tasks`` and/or ``max_resident_bytes``) only that much stays in the tables:

- A request for a task that is not resident waits (asynchronously) for its load, which runs on the
  loader thread; batches of resident tasks go on meanwhile. Requests for one task share one load.
  A load that fails fails only the requests waiting for it.
- Room is made by evicting the least recently used unpinned task that no request wants (from its
  admission until its answer: while it waits for the load, is decoded, queued and computed); a
  running batch keeps its snapshot, so nothing it reads is reused. When every resident task is
  pinned or wanted, the load goes over the budget rather than wait (by at most the distinct tasks of
  the requests in flight), and the next load evicts back down.
- Evicted tasks stay compiled in host memory while ``max_host_bytes`` allows (least recently used
  dropped first); a later miss copies them back in a few milliseconds.

Without a budget every loaded task stays resident, as the registry alone would do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

from runtime.core.registry import PreparedTask, TaskEntry, TaskRegistry, UnknownTaskError
from runtime.serving.metrics import ServerMetrics

log = logging.getLogger("e2vpt.cache")

TIERS = ("device", "host", "disk")


@dataclass(frozen=True)
class CacheBudget:
    """How much stays resident in the tables, and how much more stays compiled on the host."""

    max_resident_tasks: int | None = None
    max_resident_bytes: int | None = None
    max_host_bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_resident_tasks is not None and self.max_resident_tasks < 1:
            raise ValueError(f"max resident tasks must be at least 1, got {self.max_resident_tasks}")
        if self.max_resident_bytes is not None and self.max_resident_bytes < 1:
            raise ValueError(f"max resident bytes must be positive, got {self.max_resident_bytes}")
        if self.max_host_bytes < 0:
            raise ValueError(f"max host bytes must not be negative, got {self.max_host_bytes}")

    @property
    def bounded(self) -> bool:
        return self.max_resident_tasks is not None or self.max_resident_bytes is not None


class TaskCache:
    """Resident tasks under a budget, least recently used evicted first, pinned ones never.

    The task store calls ``put`` and ``remove`` under its load lock, so loads and evictions are
    serialized; ``hold``, ``fetch`` and the state queries are safe from any thread.
    """

    def __init__(
        self, registry: TaskRegistry, budget: CacheBudget, metrics: ServerMetrics | None = None
    ) -> None:
        self.registry = registry
        self.budget = budget
        self.metrics = metrics
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, None] = OrderedDict()  # resident tasks, least recently used first
        self._pinned: set[str] = set()
        self._host: OrderedDict[str, PreparedTask] = OrderedDict()  # least recently used first
        self._host_bytes = 0
        self._loading: dict[str, Future[TaskEntry]] = {}
        self._last: dict[str, TaskEntry] = {}  # each task's latest entry, resident or not
        self._wanted: dict[str, int] = {}  # requests in flight per task: never evicted meanwhile

    # -- requests ------------------------------------------------------------------------------------

    @contextmanager
    def wanted(self, task_id: str) -> Iterator[None]:
        """``task_id`` is not evicted while the block runs: a request from admission to answer."""
        with self._lock:
            self._wanted[task_id] = self._wanted.get(task_id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                count = self._wanted.pop(task_id) - 1
                if count:
                    self._wanted[task_id] = count

    def hold(self, task_id: str) -> TaskEntry:
        """Hold the resident ``task_id`` for one request (``TaskRegistry.hold``) and mark it used.

        Raises ``UnknownTaskError`` when it is not resident (then ``fetch`` it)."""
        entry = self.registry.hold(task_id)
        with self._lock:
            if task_id in self._recent:
                self._recent.move_to_end(task_id)
        return entry

    def fetch(self, task_id: str, start: Callable[[], Future[TaskEntry]]) -> Future[TaskEntry]:
        """The load making ``task_id`` resident: the one already running, or ``start()``'s."""
        with self._lock:
            future = self._loading.get(task_id)
            if future is not None:
                return future
            future = start()
            self._loading[task_id] = future
        if self.metrics is not None:
            self.metrics.cache_misses.inc()
        future.add_done_callback(lambda _: self._loaded(task_id))
        return future

    def _loaded(self, task_id: str) -> None:
        with self._lock:
            self._loading.pop(task_id, None)

    def host_copy(self, task_id: str) -> PreparedTask | None:
        """The compiled copy kept on the host, if any (marked used)."""
        with self._lock:
            task = self._host.get(task_id)
            if task is not None:
                self._host.move_to_end(task_id)
        return task

    # -- loads and unloads (on the loader thread) ---------------------------------------------------

    def put(
        self,
        task: PreparedTask,
        pin: bool | None = None,
        new_version: bool = True,
        started: float | None = None,
    ) -> TaskEntry:
        """Write ``task`` into the tables (replacing its resident version), evicting to stay in budget.

        ``pin``: True pins it, False unpins it, None keeps its pin as it was. ``new_version=False``:
        the package it had before, made resident again (it keeps its version). ``started``: the
        ``perf_counter`` instant its load began (reading the package included), for the load metrics.
        """
        started = time.perf_counter() if started is None else started
        with self._lock:
            source = "host" if self._host.get(task.task_id) is task else "disk"
            if pin:
                self._pinned.add(task.task_id)
            elif pin is not None:
                self._pinned.discard(task.task_id)
        self._make_room(task)
        entry = self.registry.insert(task, new_version, started)
        self._keep_on_host(task)
        with self._lock:
            self._last[task.task_id] = entry
            self._recent[task.task_id] = None
            self._recent.move_to_end(task.task_id)
        if self.metrics is not None:
            self.metrics.cache_loads.labels(task.task_id, source).inc()
            self.metrics.cache_load_seconds.labels(source).observe(time.perf_counter() - started)
        self._count()
        return entry

    def remove(self, task_id: str) -> TaskEntry:
        """Unload ``task_id`` from every tier and unpin it (an explicit unload, or its file is gone)."""
        with self._lock:
            self._pinned.discard(task_id)
            self._recent.pop(task_id, None)
            self._last.pop(task_id, None)
            self._drop_host(task_id)
        try:
            return self.registry.remove(task_id)
        finally:
            self._count()

    def forget_host_copy(self, task_id: str) -> None:
        """Its package changed: a compiled copy on the host is stale."""
        with self._lock:
            self._drop_host(task_id)

    def _make_room(self, incoming: PreparedTask) -> None:
        budget = self.budget
        if not budget.bounded:
            return
        incoming_bytes = self.registry.entry_bytes(incoming)
        while True:
            tasks = self.registry.snapshot.tasks
            staying = {key: entry for key, entry in tasks.items() if key != incoming.task_id}
            count_over = (
                budget.max_resident_tasks is not None and len(staying) + 1 > budget.max_resident_tasks
            )
            used = sum(entry.nbytes for entry in staying.values()) + incoming_bytes
            bytes_over = budget.max_resident_bytes is not None and used > budget.max_resident_bytes
            if not (count_over or bytes_over) or not self._evict_one(staying, incoming.task_id):
                return

    def _evict_one(self, resident: dict[str, TaskEntry], keep: str) -> bool:
        """Evict the least recently used unpinned, unheld task; False when there is none."""
        with self._lock:
            candidates = [
                task_id
                for task_id in self._recent
                if task_id not in self._pinned and task_id not in self._wanted and task_id != keep
            ]
        for task_id in candidates:
            if task_id not in resident:
                continue
            try:
                evicted = self.registry.evict(task_id)
            except UnknownTaskError:
                continue
            if evicted is None:  # a request holds it (e.g. a direct engine user)
                continue
            with self._lock:
                self._recent.pop(task_id, None)
            if self.metrics is not None:
                self.metrics.cache_evictions.labels(task_id).inc()
            log.debug("task evicted", extra={"task": task_id})
            return True
        log.warning("every resident task is pinned or in use: over the resident budget until one is free")
        if self.metrics is not None:
            self.metrics.cache_over_budget.inc()
        return False

    def _keep_on_host(self, task: PreparedTask) -> None:
        if self.budget.max_host_bytes <= 0 or not self.budget.bounded:
            return
        host = task.to("cpu")
        with self._lock:
            self._drop_host(task.task_id)
            if host.nbytes > self.budget.max_host_bytes:
                return
            while self._host_bytes + host.nbytes > self.budget.max_host_bytes:
                self._drop_host(next(iter(self._host)))
            self._host[task.task_id] = host
            self._host_bytes += host.nbytes

    def _drop_host(self, task_id: str) -> None:
        """Under ``_lock``."""
        task = self._host.pop(task_id, None)
        if task is not None:
            self._host_bytes -= task.nbytes

    # -- state ---------------------------------------------------------------------------------------

    def tier(self, task_id: str) -> str:
        """Where ``task_id`` is now: ``device`` (resident), ``host`` (compiled) or ``disk``."""
        if task_id in self.registry:
            return "device"
        with self._lock:
            return "host" if task_id in self._host else "disk"

    def last_entry(self, task_id: str) -> TaskEntry | None:
        """The entry ``task_id`` had when last resident (its metadata, version and statistics'
        keys), or ``None`` if it never loaded. Never for computing: hold it instead."""
        with self._lock:
            return self._last.get(task_id)

    def last_entries(self) -> dict[str, TaskEntry]:
        """Every task's entry as of when it was last resident (see ``last_entry``)."""
        with self._lock:
            return dict(self._last)

    def _count(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            host = len(self._host)
        self.metrics.cache_tasks.labels("device").set(len(self.registry))
        self.metrics.cache_tasks.labels("host").set(host)

"""The task directory: which packages exist, which are loaded, and Triton's model-control modes.

``DIR/<task id>.safetensors`` holds a task. Only ids matching ``TASK_ID_PATTERN`` are loadable,
and only files that resolve (symlinks followed) to a regular file directly inside ``DIR``.
Modes: ``none`` loads everything at start and refuses load/unload requests; ``explicit`` loads
the ``--load-task`` ids at start, then on request; ``poll`` rescans the directory periodically,
loading new or changed files (by mtime and size) and unloading deleted ones.

One bad file affects only its own task: any failure to load it is recorded as that task's state
(shown by ``index``) and the start-up loads and scans go on with the other files.

With a resident budget (:class:`runtime.serving.task_cache.CacheBudget`) the store *registers* tasks
instead of loading them all: every package of the directory in ``none`` and ``poll`` modes, the
``--load-task`` ids and every explicitly loaded task in ``explicit`` mode. A registered task is
servable; :class:`runtime.serving.task_cache.TaskCache` makes it resident on its first request.

Packages are read through a :class:`runtime.serving.package_source.PackageSource` (the directory by
default; an object store plugs in there, see that module).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from runtime.core.backbone import Backbone
from runtime.core.files import shown
from runtime.core.package import PackageError, TaskPackage, check_task_id
from runtime.core.registry import PreparedTask, TaskEntry, TaskRegistry, UnknownTaskError
from runtime.serving.metrics import ServerMetrics
from runtime.serving.package_source import DirectorySource, PackageSource, Signature, TaskNotFoundError
from runtime.serving.task_cache import CacheBudget, TaskCache
from runtime.serving.threads import use_one_thread

log = logging.getLogger("e2vpt.tasks")

MODES = ("none", "explicit", "poll")
LOAD_ALL = "*"


class ModelControlError(PermissionError):
    """Load/unload requests are not allowed in this model-control mode."""


class TaskLoadCancelledError(RuntimeError):
    """An unload of the task arrived while its load was running; the load was undone."""


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class TaskStore:
    """Loads and unloads tasks from one directory into a registry; safe to call from several threads.

    Locking, so that nothing waits behind a slow load except another load:

    - ``_load_lock`` serializes loads (of any task): a package is read, checked and compiled by one
      thread at a time, and a file's successive versions load in order. Only ``load`` takes it.
    - ``_state_lock`` guards the small per-task dictionaries and is held only while they change
      (never across file I/O or compiling). ``unload``, ``index`` and ``failures`` take only this
      lock and the registry's own short lock, so they answer while a load runs.
    - ``unload`` of a task whose load is running does not wait: it marks the load cancelled and
      removes what is loaded; the load then undoes its own registry add and raises
      ``TaskLoadCancelledError``. Either order ends with the task unloaded.

    Per-task state is bounded by the directory, not by requests: an invalid id is refused before
    anything is stored, a failed load is remembered only when the task's file exists, and entries
    of files that disappeared are dropped at the next ``index`` or scan. Messages name packages by
    their file name, never by a server path, and show at most 64 characters of a requested id.
    ``index`` lists the directory (file-system I/O): call it off an event loop, like ``load``.
    """

    def __init__(
        self,
        directory: str | Path,
        registry: TaskRegistry,
        mode: str = "none",
        metrics: ServerMetrics | None = None,
        budget: CacheBudget | None = None,
        loader: Executor | None = None,
        source: PackageSource | None = None,
    ) -> None:
        """``directory`` holds the packages, unless ``source`` is given (it then holds only local state,
        such as the scale-out record of ``runtime.scaleout.desired``)."""
        if mode not in MODES:
            raise ValueError(f"model control mode {mode!r} is not one of {MODES}")
        directory_source = DirectorySource(directory)
        self.root = directory_source.root
        self.source: PackageSource = source or directory_source
        self.registry = registry
        self.mode = mode
        self.metrics = metrics
        self._load_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._errors: dict[str, str] = {}
        self._signatures: dict[str, Signature] = {}
        self._failed_signatures: dict[str, Signature] = {}
        self._loading: dict[str, bool] = {}  # task id -> cancelled, while its load runs
        self._registered: set[str] = set()  # servable on demand (bounded cache only)
        self._on_demand_failures: set[str] = set()  # failed when a request needed them
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._own_loader = loader is None
        self._loader = loader or ThreadPoolExecutor(1, "e2vpt-task-load", initializer=use_one_thread)
        self.cache = TaskCache(registry, budget or CacheBudget(), metrics)

    @property
    def bounded(self) -> bool:
        """A resident budget is set: tasks are registered, and resident on demand."""
        return self.cache.budget.bounded

    def servable(self, task_id: str) -> bool:
        """Resident, or registered and loadable on demand."""
        return task_id in self.registry or task_id in self._registered

    def holds_tasks(self) -> bool:
        """Some task is resident or registered."""
        return len(self.registry) > 0 or bool(self._registered)

    def fetch(self, task_id: str) -> Future[TaskEntry]:
        """Make the registered ``task_id`` resident (on the loader): one load for all who wait."""
        return self.cache.fetch(task_id, lambda: self._loader.submit(self.load, task_id, None, True))

    @property
    def backbone(self) -> Backbone:
        return self.registry.backbone

    def available(self) -> list[str]:
        """Task ids with a package in the repository (valid ids only, sorted)."""
        return self.source.ids()

    def load(self, task_id: str, pin: bool | None = None, on_demand: bool = False) -> TaskEntry:
        """Load or replace ``task_id`` from its package; a bad package leaves loaded tasks untouched.

        ``pin``: True pins it in the tables, False unpins it, None leaves its pin as it was.
        ``on_demand``: a request needs it (its failure then fails those requests, not readiness).

        Raises ``PackageError`` (invalid id, or a package that cannot be read, is corrupt or does not
        fit), ``TaskNotFoundError``, ``TaskLoadCancelledError``, or what compiling raised (e.g.
        ``MemoryError``); every failure but an invalid id or a missing file is kept for ``index``.
        """
        started = time.perf_counter()
        try:
            check_task_id(task_id)
        except PackageError:
            self._count("failure")
            raise
        with self._load_lock:
            resident = self.registry.snapshot.tasks.get(task_id)
            if on_demand and resident is not None:  # an earlier load made it resident meanwhile
                return resident
            with self._state_lock:
                self._loading[task_id] = False
            signature: Signature | None = None
            try:
                signature = self.source.signature(task_id)
                entry = self._read_and_add(task_id, signature, pin, on_demand, started)
            except BaseException as error:
                with self._state_lock:
                    del self._loading[task_id]
                    if not isinstance(error, TaskNotFoundError):  # only names with a file are remembered
                        self._errors[task_id] = _reason(error)
                        if on_demand:
                            self._on_demand_failures.add(task_id)
                            if signature is not None:  # its requests fail at once until the file changes
                                self._failed_signatures[task_id] = signature
                self._count("failure")
                self._log_failure(task_id, error)
                raise
            with self._state_lock:
                cancelled = self._loading.pop(task_id)
                if not cancelled:
                    self._signatures[task_id] = signature
                    self._errors.pop(task_id, None)
                    self._failed_signatures.pop(task_id, None)
                    self._on_demand_failures.discard(task_id)
                    if self.bounded:
                        self._registered.add(task_id)
            if cancelled:
                with contextlib.suppress(UnknownTaskError):  # the unload already removed it
                    self.cache.remove(task_id)
                self._count(None)
                log.info("task load cancelled by an unload", extra={"task": task_id})
                raise TaskLoadCancelledError(f"the load of task {shown(task_id)} was cancelled by an unload")
        seconds = time.perf_counter() - started
        self._count("success", seconds)
        log.info(
            "task loaded", extra={"task": task_id, "version": entry.version, "seconds": round(seconds, 4)}
        )
        return entry

    def _read_and_add(
        self, task_id: str, signature: Signature, pin: bool | None, on_demand: bool, started: float
    ) -> TaskEntry:
        name = self.source.package_name(task_id)
        with self._state_lock:
            unchanged = self._signatures.get(task_id) == signature
            failed = on_demand and self._failed_signatures.get(task_id) == signature
            reason = self._errors.get(task_id, "")
        if failed:
            raise PackageError(reason or f"task package {name}: failed to load")
        # A compiled copy on the host is written back only while its package is the one it came from.
        task = self.cache.host_copy(task_id) if unchanged else None
        if task is None:
            package = self.source.read(task_id, self.backbone)
            self._check_fits(package, name, task_id)
            task = PreparedTask.of(package, self.backbone)
        return self.cache.put(task, pin, new_version=not (on_demand and unchanged), started=started)

    def _check_fits(self, package: TaskPackage, file_name: str, task_id: str) -> None:
        if package.task_id != task_id:
            raise PackageError(
                f"task package {file_name}: field 'task_id' is {package.task_id!r}, "
                f"which does not match the file name"
            )
        if package.preprocess.input_size != self.backbone.spec.img_size:
            raise PackageError(
                f"task package {file_name}: field 'preprocess.input_size' {package.preprocess.input_size} "
                f"differs from the backbone's image size {self.backbone.spec.img_size}"
            )

    def unload(self, task_id: str) -> TaskEntry | None:
        """Unload ``task_id`` without waiting for a running load (see the class docstring).

        Returns the removed entry, or ``None`` when only a running load was cancelled; raises
        ``UnknownTaskError`` when the task is neither loaded nor loading.
        """
        check_task_id(task_id)
        with self._state_lock:
            cancelling = task_id in self._loading
            if cancelling:
                self._loading[task_id] = True
            self._signatures.pop(task_id, None)
            registered = task_id in self._registered
            self._registered.discard(task_id)
        try:
            entry: TaskEntry | None = self.cache.remove(task_id)
        except UnknownTaskError:
            if not (cancelling or registered):
                raise
            entry = None
        self._count(None)
        log.info("task unloaded", extra={"task": task_id, "version": entry.version if entry else None})
        return entry

    def failures(self, on_demand: bool = True) -> dict[str, str]:
        """The last load failure of each task whose package file exists but did not load
        (``on_demand=False``: only of loads no request asked for: start, polls, explicit loads)."""
        with self._state_lock:
            return {
                task_id: reason
                for task_id, reason in self._errors.items()
                if on_demand or task_id not in self._on_demand_failures
            }

    def _log_failure(self, task_id: str, error: BaseException) -> None:
        if isinstance(error, PackageError | TaskNotFoundError):
            log.warning("task load failed", extra={"task": task_id, "error": str(error)})
        else:
            log.error("task load failed unexpectedly", extra={"task": task_id}, exc_info=error)

    def _count(self, outcome: str | None, seconds: float | None = None) -> None:
        if self.metrics is None:
            return
        if outcome is not None:
            self.metrics.task_loads.labels(outcome).inc()
        if seconds is not None:
            self.metrics.load_seconds.observe(seconds)
        self.metrics.tasks_loaded.set(len(self.registry))
        self.metrics.tasks_registered.set(len(self._registered) if self.bounded else len(self.registry))

    def check_control_allowed(self) -> None:
        if self.mode != "explicit":
            raise ModelControlError(
                f"explicit model load / unload is not allowed in model control mode {self.mode!r}"
            )

    def start(
        self, load_tasks: list[str] | None = None, poll_seconds: float = 5.0, pin_tasks: Iterable[str] = ()
    ) -> None:
        """Initial loads (or registrations, with a budget) for the mode, then polling if asked.

        A package that fails is recorded and skipped, except one named in ``load_tasks`` in explicit
        mode, or pinned: the operator asked for that task, so its failure stops the start. Pinned
        tasks load at start and stay resident.
        """
        named = [t for t in load_tasks or [] if t != LOAD_ALL]
        pinned = list(pin_tasks)
        if self.mode == "explicit":
            wanted = self.available() if LOAD_ALL in (load_tasks or []) else named
        else:
            wanted = self.available()
        if self.bounded:
            with self._state_lock:
                self._registered.update(wanted)
            wanted = []
        for task_id in dict.fromkeys([*pinned, *wanted]):
            try:
                self.load(task_id, pin=True if task_id in pinned else None)
            except Exception:
                if task_id in pinned or (self.mode == "explicit" and task_id in named):
                    raise
        self._count(None)
        if self.mode == "poll":
            self._poller = threading.Thread(
                target=self._poll_loop, args=(poll_seconds,), name="e2vpt-task-poll", daemon=True
            )
            self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        if self._own_loader:
            self._loader.shutdown(wait=False, cancel_futures=True)

    def _poll_loop(self, interval: float) -> None:
        use_one_thread()
        while not self._stop.wait(interval):
            try:
                self.poll_once()
            except Exception:  # keep polling whatever one scan hit
                log.exception("task directory scan failed")

    def poll_once(self) -> None:
        """Load new and changed packages, unload tasks whose package disappeared; a bad file is skipped."""
        present = set(self.available())
        self._forget_absent(present)
        for task_id in sorted(present):
            try:
                signature = self.source.signature(task_id)
            except (PackageError, TaskNotFoundError):  # deleted meanwhile, or a dangling link
                continue
            with self._state_lock:
                # An unchanged file is not reloaded, nor retried if it failed.
                known = signature in (self._signatures.get(task_id), self._failed_signatures.get(task_id))
                loaded_before = task_id in self._signatures
                if self.bounded:
                    self._registered.add(task_id)
            if known:
                continue
            if self.bounded and task_id not in self.registry:
                # Not resident: registered now; a compiled copy of an older file is stale.
                if loaded_before:
                    self.cache.forget_host_copy(task_id)
                continue
            try:
                self.load(task_id)
            except Exception:  # recorded and logged by load; the scan goes on
                with self._state_lock:
                    self._failed_signatures[task_id] = signature
        with self._state_lock:
            gone = (set(self.registry.snapshot.tasks) | self._registered) - present
        for task_id in sorted(gone):
            with contextlib.suppress(UnknownTaskError):  # unloaded meanwhile
                self.unload(task_id)

    def _forget_absent(self, present: set[str]) -> None:
        """Drop the failure records of files no longer in the directory."""
        with self._state_lock:
            for records in (self._errors, self._failed_signatures):
                for task_id in set(records) - present:
                    del records[task_id]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every package in the directory and every loaded task, with state and reason.

        With a budget a registered task is READY wherever it is; its reason says which tier holds it
        (``resident``, ``host``: compiled in host memory, ``disk``: loads on its first request)."""
        tasks = self.registry.snapshot.tasks
        present = set(self.available())
        self._forget_absent(present)
        errors = self.failures()
        with self._state_lock:
            registered = set(self._registered)
        entries = []
        for task_id in sorted(present | set(tasks) | registered):
            entry = tasks.get(task_id)
            if task_id in errors and entry is None:
                if not ready_only:
                    entries.append(IndexEntry(task_id, "", "UNAVAILABLE", errors[task_id]))
            elif entry is not None or task_id in registered:
                version = str(entry.version) if entry is not None else ""
                tier = self.cache.tier(task_id) if self.bounded else ""
                entries.append(IndexEntry(task_id, version, "READY", TIER_REASONS.get(tier, "")))
            elif not ready_only:
                entries.append(IndexEntry(task_id, "", "UNAVAILABLE", "not loaded"))
        return entries


TIER_REASONS = {
    "device": "resident",
    "host": "compiled in host memory",
    "disk": "on disk: loads on its first request",
}


def _reason(error: BaseException) -> str:
    """A failure as ``index`` shows it (package errors name files by their name, never by a path)."""
    if isinstance(error, PackageError):
        return str(error)
    return f"load failed: {type(error).__name__}"

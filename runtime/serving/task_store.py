"""The task directory: which packages exist, which are loaded, and Triton's model-control modes.

``DIR/<task id>.safetensors`` holds a task. Only ids matching ``TASK_ID_PATTERN`` are loadable,
and only files that resolve (symlinks followed) to a regular file directly inside ``DIR``.
Modes: ``none`` loads everything at start and refuses load/unload requests; ``explicit`` loads
the ``--load-task`` ids at start, then on request; ``poll`` rescans the directory periodically,
loading new or changed files (by mtime and size) and unloading deleted ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.core.backbone import Backbone
from runtime.core.package import PACKAGE_SUFFIX, TASK_ID_PATTERN, PackageError, check_task_id, load_package
from runtime.core.registry import TaskEntry, TaskRegistry, UnknownTaskError
from runtime.serving.metrics import ServerMetrics
from runtime.serving.threads import use_one_thread

log = logging.getLogger("e2vpt.tasks")

MODES = ("none", "explicit", "poll")
LOAD_ALL = "*"


class TaskNotFoundError(LookupError):
    """No package for this task id in the task directory."""


class ModelControlError(PermissionError):
    """Load/unload requests are not allowed in this model-control mode."""


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class TaskStore:
    """Loads and unloads tasks from one directory into a registry; safe to call from several threads."""

    def __init__(
        self,
        directory: str | Path,
        registry: TaskRegistry,
        mode: str = "none",
        metrics: ServerMetrics | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"model control mode {mode!r} is not one of {MODES}")
        self.root = Path(directory).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"task directory {directory} does not exist")
        self.registry = registry
        self.mode = mode
        self.metrics = metrics
        self._lock = threading.Lock()
        self._errors: dict[str, str] = {}
        self._signatures: dict[str, tuple[int, int]] = {}
        self._failed_signatures: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def backbone(self) -> Backbone:
        return self.registry.backbone

    def path_for(self, task_id: str) -> Path:
        """The package file of ``task_id``, refusing bad ids and anything resolving outside the directory."""
        check_task_id(task_id)
        path = (self.root / f"{task_id}{PACKAGE_SUFFIX}").resolve()
        if path.parent != self.root:
            raise PackageError(f"task {task_id!r}: package resolves outside the task directory")
        if not path.is_file():
            raise TaskNotFoundError(
                f"task {task_id!r}: no package {task_id}{PACKAGE_SUFFIX} in the task directory"
            )
        return path

    def available(self) -> list[str]:
        """Task ids with a package file in the directory (valid names only, sorted)."""
        ids = []
        for path in self.root.glob(f"*{PACKAGE_SUFFIX}"):
            task_id = path.name[: -len(PACKAGE_SUFFIX)]
            if TASK_ID_PATTERN.match(task_id):
                ids.append(task_id)
        return sorted(ids)

    def load(self, task_id: str) -> TaskEntry:
        """Load or replace ``task_id`` from its package; a bad package leaves loaded tasks untouched."""
        started = time.perf_counter()
        try:
            with self._lock:
                path = self.path_for(task_id)
                stat = path.stat()
                package = load_package(path, self.backbone)
                if package.task_id != task_id:
                    raise PackageError(
                        f"task package {path.name}: field 'task_id' is {package.task_id!r}, "
                        f"which does not match the file name"
                    )
                if package.preprocess.input_size != self.backbone.spec.img_size:
                    raise PackageError(
                        f"task package {path.name}: field 'preprocess.input_size' "
                        f"{package.preprocess.input_size} "
                        f"differs from the backbone's image size {self.backbone.spec.img_size}"
                    )
                entry = self.registry.add(package)
                self._signatures[task_id] = (stat.st_mtime_ns, stat.st_size)
                self._errors.pop(task_id, None)
        except (PackageError, TaskNotFoundError) as error:
            self._errors[task_id] = str(error)
            self._count("failure")
            log.warning("task load failed", extra={"task": task_id, "error": str(error)})
            raise
        seconds = time.perf_counter() - started
        self._count("success", seconds)
        log.info(
            "task loaded", extra={"task": task_id, "version": entry.version, "seconds": round(seconds, 4)}
        )
        return entry

    def unload(self, task_id: str) -> TaskEntry:
        check_task_id(task_id)
        with self._lock:
            entry = self.registry.remove(task_id)
            self._signatures.pop(task_id, None)
        self._count(None)
        log.info("task unloaded", extra={"task": task_id, "version": entry.version})
        return entry

    def _count(self, outcome: str | None, seconds: float | None = None) -> None:
        if self.metrics is None:
            return
        if outcome is not None:
            self.metrics.task_loads.labels(outcome).inc()
        if seconds is not None:
            self.metrics.load_seconds.observe(seconds)
        self.metrics.tasks_loaded.set(len(self.registry))

    def check_control_allowed(self) -> None:
        if self.mode != "explicit":
            raise ModelControlError(
                f"explicit model load / unload is not allowed in model control mode {self.mode!r}"
            )

    def start(self, load_tasks: list[str] | None = None, poll_seconds: float = 5.0) -> None:
        """Initial loads for the mode (a bad package is logged and skipped), then polling if asked."""
        if self.mode == "explicit":
            wanted = self.available() if LOAD_ALL in (load_tasks or []) else list(load_tasks or [])
        else:
            wanted = self.available()
        for task_id in wanted:
            try:
                self.load(task_id)
            except (PackageError, TaskNotFoundError):
                if self.mode == "explicit" and task_id in (load_tasks or []):
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

    def _poll_loop(self, interval: float) -> None:
        use_one_thread()
        while not self._stop.wait(interval):
            try:
                self.poll_once()
            except Exception:  # keep polling whatever one scan hit
                log.exception("task directory scan failed")

    def poll_once(self) -> None:
        """Load new and changed packages, unload tasks whose package disappeared."""
        present = set(self.available())
        for task_id in sorted(present):
            try:
                stat = os.stat(self.root / f"{task_id}{PACKAGE_SUFFIX}")
            except FileNotFoundError:
                continue
            signature = (stat.st_mtime_ns, stat.st_size)
            # An unchanged file is not reloaded, nor retried if it failed.
            if signature in (self._signatures.get(task_id), self._failed_signatures.get(task_id)):
                continue
            try:
                self.load(task_id)
            except (PackageError, TaskNotFoundError):
                self._failed_signatures[task_id] = signature
        for task_id in sorted(set(self.registry.snapshot.tasks) - present):
            with contextlib.suppress(UnknownTaskError):  # unloaded meanwhile
                self.unload(task_id)

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every package in the directory and every loaded task, with state and reason."""
        tasks = self.registry.snapshot.tasks
        entries = []
        for task_id in sorted(set(self.available()) | set(tasks)):
            entry = tasks.get(task_id)
            if entry is not None:
                entries.append(IndexEntry(task_id, str(entry.version), "READY", ""))
            elif not ready_only:
                reason = self._errors.get(task_id, "not loaded")
                entries.append(IndexEntry(task_id, "", "UNAVAILABLE", reason))
        return entries

"""The repository's desired state, shared by every replica through the task directory.

In explicit model-control mode a load or unload reaches ONE replica. That replica applies it, then
records it in ``DIR/.e2vpt-desired.json``: every task that should be loaded, with a generation
that grows with each load (a load of a loaded task replaces it). The record is written atomically
(temp file + rename) under an exclusive ``flock`` so two replicas never lose each other's change.
Every replica polls the record and reconciles its own store: it loads a task whose generation it
has not applied and unloads a task the record no longer lists. See docs/scaling.md for timings.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from runtime.core.files import atomic_write
from runtime.core.package import PACKAGE_SUFFIX, TASK_ID_PATTERN
from runtime.core.registry import UnknownTaskError
from runtime.serving.task_store import LOAD_ALL, TaskStore
from runtime.serving.threads import use_one_thread

log = logging.getLogger("e2vpt.scaleout")

RECORD_NAME = ".e2vpt-desired.json"
LOCK_NAME = ".e2vpt-desired.lock"
DEFAULT_POLL_SECONDS = 0.5

Tasks = dict[str, int]  # task id -> generation


def read_record(root: Path) -> Tasks | None:
    """The desired tasks, or None when no record was written yet."""
    try:
        return {str(k): int(v) for k, v in json.loads((root / RECORD_NAME).read_bytes())["tasks"].items()}
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_record(root: Path, change: Callable[[Tasks], None]) -> Tasks:
    """Read, change and rewrite the record as one step against every other writer."""
    with _locked(root):
        tasks = read_record(root) or {}
        change(tasks)
        atomic_write(root / RECORD_NAME, lambda: json.dumps({"tasks": tasks}, sort_keys=True).encode())
        return tasks


def initialize_record(root: Path, load_tasks: list[str]) -> Tasks:
    """At deployment: the record starts as ``--load-task`` says (``*``: every package present)."""
    if LOAD_ALL in load_tasks:
        names = [p.name[: -len(PACKAGE_SUFFIX)] for p in root.glob(f"*{PACKAGE_SUFFIX}")]
        load_tasks = [name for name in names if TASK_ID_PATTERN.fullmatch(name)]

    def reset(tasks: Tasks) -> None:
        tasks.clear()
        tasks.update(dict.fromkeys(load_tasks, 1))

    return update_record(root, reset)


class Reconciler:
    """Keeps one replica's ``TaskStore`` equal to the record; records the loads it is asked for.

    Only tasks the reconciler knows from the record are ever unloaded by it, so a task this replica
    has just loaded but not yet recorded is left alone. One lock orders reconciling and recording.
    """

    def __init__(self, store: TaskStore, poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        self.store = store
        self.poll_seconds = poll_seconds
        self._applied: Tasks = {}
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # the record's (mtime, size) last applied
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="e2vpt-reconcile", daemon=True)

    def start(self) -> None:
        self.reconcile_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        use_one_thread()
        while not self._stop.wait(self.poll_seconds):
            try:
                self.reconcile_once()
            except Exception:  # keep reconciling whatever one pass hit
                log.exception("reconciling with the desired-state record failed")

    def reconcile_once(self) -> None:
        with self._lock:
            try:
                stat = os.stat(self.store.root / RECORD_NAME)
            except FileNotFoundError:
                return
            if (stat.st_mtime_ns, stat.st_size) == self._seen:
                return
            desired = read_record(self.store.root) or {}
            for task_id, generation in sorted(desired.items()):
                if self._applied.get(task_id) != generation:
                    self._applied[task_id] = generation  # a failure is kept by the store's index
                    with contextlib.suppress(Exception):
                        self.store.load(task_id)
            for task_id in sorted(set(self._applied) - set(desired)):
                del self._applied[task_id]
                with contextlib.suppress(UnknownTaskError):
                    self.store.unload(task_id)
            self._seen = (stat.st_mtime_ns, stat.st_size)

    def record_load(self, task_id: str) -> None:
        """After this replica loaded ``task_id``: every other replica loads it too."""
        with self._lock:

            def bump(tasks: Tasks) -> None:
                tasks[task_id] = max(tasks.values(), default=0) + 1

            self._applied[task_id] = update_record(self.store.root, bump)[task_id]

    def record_unload(self, task_id: str) -> None:
        """After this replica unloaded ``task_id``: every other replica unloads it too."""
        with self._lock:

            def drop(tasks: Tasks) -> None:
                tasks.pop(task_id, None)

            update_record(self.store.root, drop)
            self._applied.pop(task_id, None)

"""The task directory under attack: poisoned packages, hostile names, unloads during slow loads."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime.core.backbone import Backbone
from runtime.core.package import PackageError, content_checksum
from runtime.core.registry import TaskRegistry, UnknownTaskError
from runtime.serving.task_store import TaskLoadCancelledError, TaskNotFoundError, TaskStore
from tests.server_helpers import write_tasks

# How long a call that must not wait behind a held load may take before it counts as waiting: far more
# than it needs, far less than the held load's own 10 s release timeout.
WAITING_SECONDS = 5.0


def finishes_while_the_load_is_held(call: Callable[[], object]) -> None:
    """Run ``call`` on a thread of its own; fail if it still waits (behind the held load) or raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as error:
            errors.append(error)

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(WAITING_SECONDS)
    assert not caller.is_alive(), f"{call} waited behind the held load"
    if errors:
        raise errors[0]


def poison(path: Path, how: str) -> Path:
    """Rewrite a good package the way the attack findings did; checksums match where one is kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if how == "garbage":
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
        return path
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
    tensors = load_file(str(path))
    if how == "deep json":
        header["task"] = "[" * 50_000 + "]" * 50_000
    else:
        meta = json.loads(header["task"])
        if how == "provenance list":
            meta["provenance"] = ["not", "a", "mapping"]
        elif how == "string depth":
            meta["backbone"]["spec"]["depth"] = "twelve"
        header["task"] = json.dumps(meta)
    header["checksum"] = content_checksum(header["task"], tensors)
    save_file(tensors, str(path), metadata=header)
    return path


POISONS = ["garbage", "deep json", "provenance list", "string depth"]


@pytest.fixture
def directory(tiny_backbone: Backbone, tmp_path: Path) -> Path:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tiny_backbone, tasks, 3)
    return tasks


def states(store: TaskStore) -> dict[str, str]:
    return {entry.name: entry.state for entry in store.index()}


@pytest.mark.parametrize("how", POISONS)
def test_mode_none_loads_the_good_packages_and_marks_the_poisoned_one(
    how: str, tiny_backbone: Backbone, directory: Path
) -> None:
    poison(directory / "task-1.safetensors", how)
    store = TaskStore(directory, TaskRegistry(tiny_backbone), mode="none")
    store.start()
    assert states(store) == {"task-0": "READY", "task-1": "UNAVAILABLE", "task-2": "READY"}
    reason = {e.name: e.reason for e in store.index()}["task-1"]
    assert reason.startswith("task package task-1.safetensors:"), reason
    assert str(directory) not in reason


@pytest.mark.parametrize("how", POISONS)
def test_mode_poll_scans_past_the_poisoned_package(
    how: str, tiny_backbone: Backbone, directory: Path
) -> None:
    poison(directory / "task-1.safetensors", how)
    store = TaskStore(directory, TaskRegistry(tiny_backbone), mode="poll")
    store.start(poll_seconds=3600)
    try:
        write_tasks(tiny_backbone, directory, 1, prefix="late")
        (directory / "task-2.safetensors").unlink()
        store.poll_once()
        assert states(store) == {"late-0": "READY", "task-0": "READY", "task-1": "UNAVAILABLE"}
    finally:
        store.stop()


@pytest.mark.parametrize("how", POISONS)
def test_mode_explicit_answers_a_clean_error_for_the_poisoned_package(
    how: str, tiny_backbone: Backbone, directory: Path
) -> None:
    poison(directory / "task-1.safetensors", how)
    store = TaskStore(directory, TaskRegistry(tiny_backbone), mode="explicit")
    store.start(["*"])
    with pytest.raises(PackageError) as caught:
        store.load("task-1")
    assert "task-1.safetensors" in str(caught.value) and str(directory) not in str(caught.value)
    assert sorted(store.registry.snapshot.tasks) == ["task-0", "task-2"]


def test_an_unexpected_failure_also_stays_with_its_task(
    tiny_backbone: Backbone, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = TaskRegistry(tiny_backbone)
    insert = registry.insert

    def failing_insert(task, new_version=True, started=None):
        if task.task_id == "task-1":
            raise MemoryError
        return insert(task, new_version, started)

    monkeypatch.setattr(registry, "insert", failing_insert)
    store = TaskStore(directory, registry, mode="none")
    store.start()
    assert states(store) == {"task-0": "READY", "task-1": "UNAVAILABLE", "task-2": "READY"}
    assert store.failures() == {"task-1": "load failed: MemoryError"}


def test_failed_loads_keep_no_state_for_names_without_a_file(
    tiny_backbone: Backbone, directory: Path
) -> None:
    store = TaskStore(directory, TaskRegistry(tiny_backbone), mode="explicit")
    huge = "x" * (2 * 2**20)
    for index in range(200):
        with pytest.raises(PackageError) as caught:
            store.load(f"{huge}/{index}")
        assert len(str(caught.value)) < 250 and "…" in str(caught.value)
        with pytest.raises(TaskNotFoundError):
            store.load(f"absent-{index}")
    assert store.failures() == {}
    assert [e.name for e in store.index()] == ["task-0", "task-1", "task-2"]


def test_failures_of_deleted_files_are_forgotten(tiny_backbone: Backbone, directory: Path) -> None:
    poison(directory / "task-1.safetensors", "garbage")
    store = TaskStore(directory, TaskRegistry(tiny_backbone), mode="explicit")
    with pytest.raises(PackageError):
        store.load("task-1")
    assert set(store.failures()) == {"task-1"}
    (directory / "task-1.safetensors").unlink()
    assert "task-1" not in states(store) and store.failures() == {}


def test_unload_and_index_do_not_wait_behind_a_slow_load(
    tiny_backbone: Backbone, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TaskStore(directory, TaskRegistry(tiny_backbone), mode="explicit")
    store.start(["task-0", "task-1"])
    reading, release = threading.Event(), threading.Event()
    read = store.source.read

    def slow_read(*args, **kwargs):
        reading.set()
        assert release.wait(10)
        return read(*args, **kwargs)

    monkeypatch.setattr(store.source, "read", slow_read)
    outcome: list[BaseException | None] = []

    def load_in_background() -> None:
        try:
            store.load("task-2")
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    loader = threading.Thread(target=load_in_background)
    loader.start()
    assert reading.wait(10)
    try:
        for call in (
            lambda: store.unload("task-0"),
            store.index,
            store.failures,
            lambda: store.unload("task-2"),
        ):
            finishes_while_the_load_is_held(call)
    finally:
        release.set()
        loader.join(10)
    assert isinstance(outcome[0], TaskLoadCancelledError), "task-2 was unloaded while it loaded"
    assert sorted(store.registry.snapshot.tasks) == ["task-1"]
    with pytest.raises(UnknownTaskError):
        store.unload("task-2")
    store.load("task-2")
    assert sorted(store.registry.snapshot.tasks) == ["task-1", "task-2"]

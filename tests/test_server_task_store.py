"""The task directory: model-control modes, polling, and what may be loaded from where."""

from __future__ import annotations

import os

import pytest

from runtime.core.package import PackageError
from runtime.core.registry import TaskRegistry
from runtime.serving.task_store import ModelControlError, TaskNotFoundError, TaskStore
from tests.server_helpers import make_package, write_tasks


def test_explicit_mode_loads_only_named_tasks(tiny_backbone, tmp_path):
    write_tasks(tiny_backbone, tmp_path, 3)
    store = TaskStore(tmp_path, TaskRegistry(tiny_backbone), mode="explicit")
    store.start(["task-1"])
    assert sorted(store.registry.snapshot.tasks) == ["task-1"]
    assert [(e.name, e.state) for e in store.index()] == [
        ("task-0", "UNAVAILABLE"),
        ("task-1", "READY"),
        ("task-2", "UNAVAILABLE"),
    ]
    assert [e.name for e in store.index(ready_only=True)] == ["task-1"]
    store.check_control_allowed()
    with pytest.raises(TaskNotFoundError):
        TaskStore(tmp_path, TaskRegistry(tiny_backbone), mode="explicit").start(["absent"])


def test_none_and_poll_modes_refuse_explicit_control(tiny_backbone, tmp_path):
    for mode in ("none", "poll"):
        with pytest.raises(ModelControlError, match="not allowed"):
            TaskStore(tmp_path, TaskRegistry(tiny_backbone), mode=mode).check_control_allowed()


def test_poll_loads_new_and_changed_packages_and_unloads_deleted(tiny_backbone, tmp_path):
    write_tasks(tiny_backbone, tmp_path, 1)
    store = TaskStore(tmp_path, TaskRegistry(tiny_backbone), mode="poll")
    store.start(poll_seconds=3600)
    try:
        assert sorted(store.registry.snapshot.tasks) == ["task-0"]
        make_package(tiny_backbone, "late", seed=5).save(tmp_path / "late.safetensors")
        store.poll_once()
        assert store.registry.get("late").version == 1
        store.poll_once()
        assert store.registry.get("late").version == 1, "an unchanged file is not reloaded"
        make_package(tiny_backbone, "late", seed=6, classes=9).save(tmp_path / "late.safetensors")
        store.poll_once()
        assert store.registry.get("late").version == 2 and store.registry.get("late").num_classes == 9
        (tmp_path / "task-0.safetensors").unlink()
        (tmp_path / "bad.safetensors").write_bytes(b"not a package")
        store.poll_once()
        assert sorted(store.registry.snapshot.tasks) == ["late"]
        index = {e.name: e for e in store.index()}
        assert index["bad"].state == "UNAVAILABLE" and "corrupt" in index["bad"].reason
    finally:
        store.stop()


def test_refuses_names_symlink_escapes_and_mismatched_ids(tiny_backbone, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    store = TaskStore(tasks, TaskRegistry(tiny_backbone), mode="explicit")
    for name in ("../x", "a/b", "", "-lead"):
        with pytest.raises(PackageError, match="is not allowed"):
            store.load(name)
    make_package(tiny_backbone, "elsewhere", seed=1).save(tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", tasks / "elsewhere.safetensors")
    with pytest.raises(PackageError, match="outside the task directory"):
        store.load("elsewhere")
    make_package(tiny_backbone, "inner", seed=1).save(tasks / "renamed.safetensors")
    with pytest.raises(PackageError, match="field 'task_id' is 'inner'"):
        store.load("renamed")
    assert len(store.registry) == 0

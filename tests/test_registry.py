"""Registry: tasks added, replaced and removed from other threads while forwards stream."""

from __future__ import annotations

import threading

import pytest
import torch

from runtime import Backbone, Engine, TaskRegistry
from runtime.core.registry import SlotTables, TaskEntry, UnknownTaskError
from tests.helpers import images_for, random_package


def test_concurrent_churn_never_fails_or_mixes_versions(tiny_backbone: Backbone) -> None:
    registry = TaskRegistry(tiny_backbone, initial_slots=2, initial_prefix=4)  # forces table growth
    engine = Engine(tiny_backbone, registry, attention="torch")
    stable, _ = random_package(tiny_backbone, "stable", seed=1)
    versions = [
        random_package(tiny_backbone, "churn", seed=10, num_prompts=5, num_classes=4)[0],
        random_package(
            tiny_backbone, "churn", seed=11, num_prompts=32, num_kv=5, pruned_tokens=9, num_classes=6
        )[0],
    ]
    registry.add(stable)
    images = images_for(tiny_backbone, 4, seed=4)

    # Expected logits of each version, computed alone on a private registry.
    expected = []
    for package in [stable, *versions]:
        alone = Engine(tiny_backbone, TaskRegistry(tiny_backbone), attention="torch")
        alone.registry.add(package)
        expected.append(alone.forward(images, [package.task_id] * 4))

    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            step = 0
            while not stop.is_set():
                registry.add(versions[step % 2])
                if step % 3 == 2:
                    registry.remove("churn")
                registry.add(random_package(tiny_backbone, f"extra-{step % 5}", seed=100 + step)[0])
                step += 1
        except BaseException as error:  # surfaced in the main thread
            errors.append(error)

    worker = threading.Thread(target=churn)
    worker.start()
    seen_versions = set()
    try:
        for _ in range(60):
            with registry.acquire() as snapshot:
                task_ids = (
                    ["stable", "churn", "stable", "churn"] if "churn" in snapshot.tasks else ["stable"] * 4
                )
                logits = engine.forward_entries(snapshot, images, snapshot.entries(task_ids))
            for row in (0, 2):
                assert torch.allclose(logits[row], expected[0][row], rtol=1e-5, atol=1e-6)
            if task_ids[1] == "churn":
                matches = [
                    index
                    for index, version in enumerate(expected[1:])
                    if all(
                        logits[row].shape == version[row].shape
                        and torch.allclose(logits[row], version[row], rtol=1e-5, atol=1e-6)
                        for row in (1, 3)
                    )
                ]
                assert len(matches) == 1, "a batch mixed two versions of a task or matched none"
                seen_versions.add(matches[0])
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    assert seen_versions, "the churned task was never observed"


def task_keys(tables: SlotTables, entry: TaskEntry) -> torch.Tensor:
    """The prefix keys ``[L, H, P, d]`` that ``tables`` hold for ``entry`` (through its page table)."""
    rows = tables.prefix_table[entry.slot, : entry.prefix_len].long()
    return tables.prefix_k.index_select(2, rows)


def test_freed_slot_is_not_reused_while_a_snapshot_holds_it(tiny_backbone: Backbone) -> None:
    registry = TaskRegistry(tiny_backbone, initial_slots=1)
    first, _ = random_package(tiny_backbone, "a", seed=1)
    registry.add(first)
    with registry.acquire() as held:
        entry = held.tasks["a"]
        keys_before = task_keys(held.tables, entry).clone()
        registry.remove("a")
        registry.add(random_package(tiny_backbone, "b", seed=2)[0])
        registry.add(random_package(tiny_backbone, "c", seed=3)[0])
        assert torch.equal(task_keys(held.tables, entry), keys_before)
    registry.add(random_package(tiny_backbone, "d", seed=4)[0])
    assert registry.get("d").slot == entry.slot  # released, then reused


def test_replace_bumps_version_and_memory_report(tiny_backbone: Backbone) -> None:
    registry = TaskRegistry(tiny_backbone)
    package, _ = random_package(
        tiny_backbone, "t", seed=1, num_prompts=10, num_kv=5, pruned_tokens=4, num_classes=7
    )
    assert registry.add(package).version == 1
    entry = registry.add(package)
    assert entry.version == 2 and len(registry) == 1
    spec = tiny_backbone.spec
    prefix = 6 + 1 + 5  # kept tokens, one null row for the four pruned, KV prompts
    assert entry.prefix_len == prefix
    memory = registry.memory()
    keys_values, bias, head = (
        2 * spec.depth * spec.embed_dim * prefix * 4,
        prefix * 4,
        7 * (spec.embed_dim + 1) * 4,
    )
    assert memory["t"] == keys_values + bias + head
    assert memory["__tables_allocated__"] >= memory["t"]


def test_tasks_take_exactly_their_rows(tiny_backbone: Backbone) -> None:
    # Tasks of prefix lengths 2..30 and heads of 2..40 classes: each takes its own rows, no padding,
    # no row shared; the pools only grow by the step that keeps their free share small.
    registry = TaskRegistry(tiny_backbone, initial_slots=2, initial_prefix=4, initial_classes=4)
    lengths = {}
    for index, prompts in enumerate((1, 29, 5, 12, 3)):
        package, _ = random_package(
            tiny_backbone, f"t{index}", seed=index, num_prompts=prompts, num_kv=1, num_classes=2 + 9 * index
        )
        lengths[package.task_id] = registry.add(package)
    tables = registry.tables
    prefix_rows = [r for e in lengths.values() for r in tables.prefix_table[e.slot, : e.prefix_len].tolist()]
    class_rows = [r for e in lengths.values() for r in tables.head_table[e.slot, : e.num_classes].tolist()]
    assert len(set(prefix_rows)) == len(prefix_rows) == sum(e.prefix_len for e in lengths.values())
    assert len(set(class_rows)) == len(class_rows) == sum(e.num_classes for e in lengths.values())
    assert tables.prefix_rows <= 1.25 * len(prefix_rows) + 8
    assert tables.class_rows <= 1.25 * len(class_rows) + 8
    assert tables.prefix == 32 and tables.prefix_len[lengths["t1"].slot] == 30
    for entry in lengths.values():
        weight, _ = tables.head(entry.slot)
        assert weight.shape == (entry.num_classes, tiny_backbone.spec.embed_dim)


def test_evict_spares_held_tasks_and_rows_come_back(tiny_backbone: Backbone) -> None:
    registry = TaskRegistry(tiny_backbone, initial_slots=2)
    registry.add(random_package(tiny_backbone, "a", seed=1, num_prompts=6)[0])
    registry.add(random_package(tiny_backbone, "b", seed=2, num_prompts=6)[0])
    held = registry.hold("a")
    assert registry.evict("a") is None and "a" in registry  # a queued request still needs it
    evicted = registry.evict("b")
    assert evicted is not None and evicted.task_id == "b" and "b" not in registry
    with pytest.raises(UnknownTaskError):
        registry.evict("b")
    registry.release(held)
    assert registry.evict("a") is not None and len(registry) == 0
    # Both slots and all rows are free again: two tasks filling every row load without growing the tables.
    tables = registry.tables
    for task_id in ("c", "d"):
        package, _ = random_package(tiny_backbone, task_id, seed=3, num_prompts=15, num_kv=1, pruned_tokens=0)
        assert registry.add(package).prefix_len == tables.prefix_rows // 2
    assert registry.tables is tables


def test_heads_live_in_the_tables_and_follow_a_reallocation(tiny_backbone: Backbone) -> None:
    registry = TaskRegistry(tiny_backbone, initial_slots=1, initial_classes=4)
    package, _ = random_package(tiny_backbone, "a", seed=1, num_classes=3)
    first = registry.add(package)
    before = registry.tables.allocation
    registry.add(random_package(tiny_backbone, "b", seed=2, num_classes=9)[0])  # more slots, wider heads
    moved = registry.get("a")
    assert registry.tables.allocation == before + 1 and registry.tables.classes == 16
    assert moved.slot == first.slot
    weight, bias = registry.tables.head(moved.slot)
    assert torch.equal(weight, package.head_weight) and torch.equal(bias, package.head_bias)
    assert registry.memory()["__tables_allocated__"] == registry.tables.nbytes


def test_a_failing_tables_listener_aborts_the_load(tiny_backbone: Backbone) -> None:
    registry = TaskRegistry(tiny_backbone, initial_slots=1)
    registry.add(random_package(tiny_backbone, "a", seed=1)[0])
    before = registry.snapshot

    def refuse(tables: SlotTables) -> None:
        raise MemoryError("no room for graphs")

    registry.on_new_tables(refuse)
    with pytest.raises(MemoryError, match="no room"):
        registry.add(random_package(tiny_backbone, "b", seed=2)[0])
    assert registry.snapshot is before and registry.tables is before.tables and "b" not in registry

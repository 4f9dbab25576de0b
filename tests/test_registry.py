"""Registry: tasks added, replaced and removed from other threads while forwards stream."""

from __future__ import annotations

import threading

import pytest
import torch

from runtime import Backbone, Engine, TaskRegistry
from runtime.core.registry import SlotTables
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


def test_freed_slot_is_not_reused_while_a_snapshot_holds_it(tiny_backbone: Backbone) -> None:
    registry = TaskRegistry(tiny_backbone, initial_slots=1)
    first, _ = random_package(tiny_backbone, "a", seed=1)
    registry.add(first)
    with registry.acquire() as held:
        slot = held.tasks["a"].slot
        keys_before = held.prefix_k[:, slot].clone()
        registry.remove("a")
        registry.add(random_package(tiny_backbone, "b", seed=2)[0])
        registry.add(random_package(tiny_backbone, "c", seed=3)[0])
        assert torch.equal(held.prefix_k[:, slot], keys_before)
    registry.add(random_package(tiny_backbone, "d", seed=4)[0])
    assert registry.get("d").slot == slot  # released, then reused


def test_replace_bumps_version_and_memory_report(tiny_backbone: Backbone) -> None:
    registry = TaskRegistry(tiny_backbone)
    package, _ = random_package(tiny_backbone, "t", seed=1, num_prompts=10, num_kv=5, pruned_tokens=4)
    assert registry.add(package).version == 1
    entry = registry.add(package)
    assert entry.version == 2 and len(registry) == 1
    spec = tiny_backbone.spec
    prefix = 6 + 1 + 5  # kept tokens, one null row for the four pruned, KV prompts
    assert entry.prefix_len == prefix
    memory = registry.memory()
    assert (
        memory["t"] == 2 * spec.depth * spec.embed_dim * prefix * 4 + package.head_weight.numel() * 4 + 7 * 4
    )
    assert memory["__tables_allocated__"] >= memory["t"]


def test_held_entry_answers_with_its_version_after_replace_and_unload(tiny_backbone: Backbone) -> None:
    registry = TaskRegistry(tiny_backbone, initial_slots=1, initial_prefix=4)  # replace must grow
    engine = Engine(tiny_backbone, registry, attention="torch")
    old, _ = random_package(tiny_backbone, "t", seed=1, num_prompts=4, num_classes=3)
    new, _ = random_package(tiny_backbone, "t", seed=2, num_prompts=20, num_classes=5)
    images = images_for(tiny_backbone, 1, seed=3)
    registry.add(old)
    expected_old = engine.forward(images, ["t"])[0]
    held = registry.hold("t")
    registry.add(new)
    registry.remove("t")
    registry.add(random_package(tiny_backbone, "other", seed=4)[0])  # must not take the held slot
    assert registry.get("other").slot != held.slot
    with registry.acquire() as snapshot:
        (answer,) = engine.forward_entries(snapshot, images, [held])
    # Not bit-equal: this batch attends over a longer padded prefix (the new version's).
    assert torch.allclose(answer, expected_old, rtol=1e-5, atol=1e-6)
    registry.release(held)
    registry.add(random_package(tiny_backbone, "late", seed=5)[0])
    assert held.slot in {entry.slot for entry in registry.snapshot.tasks.values()}  # released, reused


def test_heads_live_in_the_tables_and_follow_a_reallocation(tiny_backbone: Backbone) -> None:
    registry = TaskRegistry(tiny_backbone, initial_slots=1, initial_classes=4)
    first = registry.add(random_package(tiny_backbone, "a", seed=1, num_classes=3)[0])
    assert first.head_weight.data_ptr() == registry.tables.head_weight[first.slot].data_ptr()  # a view
    registry.add(random_package(tiny_backbone, "b", seed=2, num_classes=9)[0])  # more slots, wider heads
    moved = registry.get("a")
    assert registry.tables.allocation == 1 and registry.tables.classes == 16
    assert moved.head_weight.data_ptr() == registry.tables.head_weight[moved.slot].data_ptr()
    assert torch.equal(moved.head_weight, first.head_weight) and torch.equal(moved.head_bias, first.head_bias)
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

"""Graphs on the CPU: buckets, padding, persistent buffers; replacing a task never recaptures, growth does."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from runtime.core.backbone import Backbone
from runtime.core.registry import SlotTables, TaskRegistry
from runtime.engines import Engine, make_engine
from runtime.engines.graphs import EagerReplay, Replay, batch_buckets
from tests.helpers import images_for, random_package, relative_error

# Graph rows attend over the tables' whole prefix capacity and the heads are one batched product:
# equal to the eager engine to fp32 rounding, not bit for bit.
TOLERANCE = 1e-5


class RecordingReplay(EagerReplay):
    """Eager replays that record each replayed batch size (the bucket a batch was padded to)."""

    def __init__(self) -> None:
        super().__init__()
        self.replayed: list[int] = []

    def __call__(self, forward: Replay, pool: object) -> Replay:
        inner = super().__call__(forward, pool)

        def replay() -> Tensor:
            output = inner()
            self.replayed.append(output.shape[0])
            return output

        return replay


def loaded(backbone: Backbone, **registry_options: int) -> TaskRegistry:
    registry = TaskRegistry(backbone, **registry_options)
    for index, (prompts, kv, classes) in enumerate([(1, 1, 3), (10, 5, 7), (4, 2, 5)]):
        registry.add(
            random_package(
                backbone, f"task-{index}", seed=index, num_prompts=prompts, num_kv=kv, num_classes=classes
            )[0]
        )
    return registry


def assert_close(actual: list[Tensor], expected: list[Tensor]) -> None:
    assert len(actual) == len(expected)
    for row, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got.shape == want.shape, f"row {row}"
        assert relative_error(got, want) <= TOLERANCE, f"row {row}: {relative_error(got, want):.2e}"


def test_buckets_cover_every_batch_size() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(40) == (1, 2, 4, 8, 16, 32, 40)
    assert batch_buckets(256)[-3:] == (224, 240, 256)
    for largest in (1, 5, 16, 33, 64):
        buckets = batch_buckets(largest)
        for batch in range(1, largest + 1):
            bucket = min(size for size in buckets if size >= batch)
            assert bucket - batch < 16 and (batch <= 8 or bucket - batch < batch)
    with pytest.raises(ValueError, match="at least 1"):
        batch_buckets(0)


def test_padded_bucket_equals_unpadded_eager_for_the_real_rows(small_backbone: Backbone) -> None:
    registry = loaded(small_backbone)
    capture = RecordingReplay()
    graphed = Engine(small_backbone, registry, attention="torch", graphs=capture, max_batch_size=8)
    eager = Engine(small_backbone, registry, attention="torch")
    graphed.warm_up(range(1, 9))
    assert capture.captures == 4  # buckets 1, 2, 4, 8
    images = images_for(small_backbone, 5, seed=2)
    for task_ids in (["task-1", "task-0", "task-2"], ["task-2"] * 5, ["task-0"]):
        batch = images[: len(task_ids)]
        assert_close(graphed.forward(batch, task_ids), eager.forward(batch, task_ids))
    assert capture.replayed == [4, 8, 1]
    assert capture.captures == 4


def test_replaced_task_answers_with_its_new_prompts_without_recapture(small_backbone: Backbone) -> None:
    registry = loaded(small_backbone)
    capture = RecordingReplay()
    graphed = Engine(small_backbone, registry, attention="torch", graphs=capture, max_batch_size=4)
    graphed.warm_up([4])
    images = images_for(small_backbone, 3, seed=4)
    task_ids = ["task-0", "task-1", "task-1"]
    before = graphed.forward(images, task_ids)
    allocation = registry.tables.allocation
    registry.add(random_package(small_backbone, "task-1", seed=99, num_prompts=6, num_kv=3, num_classes=4)[0])
    assert registry.tables.allocation == allocation  # fits the tables: rows rewritten in place
    after = graphed.forward(images, task_ids)
    assert capture.captures == 1 and capture.replayed == [4, 4]
    assert after[1].shape == (4,) and before[1].shape == (7,)
    assert torch.equal(after[0], before[0])
    assert_close(after, Engine(small_backbone, registry, attention="torch").forward(images, task_ids))


def test_growth_recaptures_before_the_new_tables_are_used(tiny_backbone: Backbone) -> None:
    registry = loaded(tiny_backbone, initial_slots=4, initial_prefix=16, initial_classes=16)
    capture = RecordingReplay()
    graphed = Engine(tiny_backbone, registry, attention="torch", graphs=capture, max_batch_size=4)
    graphed.warm_up([1, 2])
    assert capture.captures == 2
    seen: list[tuple[int, int, bool]] = []

    def after_the_engine(tables: SlotTables) -> None:  # listeners run in order: the engine's came first
        captured = graphed.graphs is not None and tables.allocation in graphed.graphs.captured()
        seen.append((tables.allocation, registry.snapshot.tables.allocation, captured))

    registry.on_new_tables(after_the_engine)
    old = registry.tables.allocation
    registry.add(random_package(tiny_backbone, "long", seed=7, num_prompts=32, num_kv=5, num_classes=20)[0])
    assert seen == [(old + 1, old, True)]  # captured while every snapshot still used the old tables
    assert registry.tables.allocation == old + 1
    assert (registry.tables.prefix, registry.tables.classes) == (40, 32)  # rounded up: fewer regrowths
    assert capture.captures == 4
    images = images_for(tiny_backbone, 2, seed=5)
    task_ids = ["long", "task-1"]
    assert_close(graphed.forward(images, task_ids), Engine(tiny_backbone, registry).forward(images, task_ids))
    assert capture.replayed == [2]
    assert graphed.graphs is not None
    assert graphed.graphs.captured() == {old + 1: (1, 2)}  # a batch on the new tables ran: old set dropped


def test_unwarmed_and_oversized_batches_run_eagerly(tiny_backbone: Backbone) -> None:
    registry = loaded(tiny_backbone)
    capture = RecordingReplay()
    graphed = Engine(tiny_backbone, registry, attention="torch", graphs=capture, max_batch_size=4)
    eager = Engine(tiny_backbone, registry, attention="torch")
    images = images_for(tiny_backbone, 6, seed=6)
    task_ids = ["task-0", "task-1", "task-2", "task-0", "task-1", "task-2"]
    for count in (2, 6):  # nothing warmed yet; then above the largest bucket
        if count == 6:
            graphed.warm_up([1, 2, 3, 4])
        got = graphed.forward(images[:count], task_ids[:count])
        for a, b in zip(got, eager.forward(images[:count], task_ids[:count]), strict=True):
            assert torch.equal(a, b)
    assert capture.replayed == []
    with pytest.raises(ValueError, match="above the largest bucket 4"):
        graphed.warm_up([5])
    with pytest.raises(ValueError, match=r"are not \[2, 3, 32, 32\]"):
        graphed.forward(torch.zeros(2, 3, 16, 16), ["task-0", "task-1"])


def test_cuda_graphs_are_refused_without_cuda(tiny_backbone: Backbone) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        make_engine("torch", tiny_backbone, cuda_graphs=True)

"""Compiled mixed-task forward vs the paper's forward; row isolation; bf16 error; Triton path."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from runtime import Backbone, Engine, TaskRegistry, UnknownTaskError
from tests.conftest import TINY
from tests.helpers import images_for, random_package, reference_logits, relative_error

# (prompt tokens, KV prompts, shared KV, pruned tokens, pruned segments)
SETTINGS = [
    (1, 1, True, 0, 0),
    (1, 5, False, 0, 3),
    (10, 5, True, 3, 0),
    (10, 1, False, 4, 37),
    (32, 5, True, 12, 150),
    (32, 1, False, 0, 200),
    (10, 5, True, 10, 0),  # every token pruned: one null row stands for all ten
]


def load_tasks(backbone: Backbone) -> tuple[Engine, dict]:
    engine = Engine(backbone, TaskRegistry(backbone), attention="torch")
    prompts = {}
    for index, (tokens, kv, shared, pruned, segments) in enumerate(SETTINGS):
        package, prompts[f"task-{index}"] = random_package(
            backbone,
            f"task-{index}",
            seed=index,
            num_prompts=tokens,
            num_kv=kv,
            shared_kv=shared,
            pruned_tokens=pruned,
            pruned_segments=segments,
            num_classes=3 + index,
        )
        engine.registry.add(package)
    return engine, prompts


@pytest.mark.parametrize("backbone_name", ["tiny_backbone", "small_backbone"])
def test_mixed_batch_equals_paper_forward(backbone_name: str, request: pytest.FixtureRequest) -> None:
    backbone = request.getfixturevalue(backbone_name)
    engine, prompts = load_tasks(backbone)
    task_ids = [f"task-{i % len(SETTINGS)}" for i in (0, 1, 2, 3, 4, 5, 6, 4, 2, 6)]
    images = images_for(backbone, len(task_ids))
    logits = engine.forward(images, task_ids)
    for row, task_id in enumerate(task_ids):
        expected = reference_logits(backbone, prompts[task_id], images[row : row + 1])[0]
        assert logits[row].shape == expected.shape
        assert relative_error(logits[row], expected) <= 1e-5, (task_id, relative_error(logits[row], expected))


def test_segment_mask_is_interleaved(tiny_backbone: Backbone) -> None:
    """Dim ``d`` of a prompt token belongs to segment ``d mod S``: exactly those dims are zeroed.

    Fails if the mask were ignored (nothing zeroed) or read blocked (segment ``s`` = dims
    ``s * D/S .. (s + 1) * D/S - 1``).
    """
    package, prompts = random_package(tiny_backbone, "seg", seed=3, num_prompts=4, pruned_segments=20)
    segment_mask = prompts.segment_mask  # [Np, S]; no token is pruned, so package tokens line up
    assert segment_mask is not None
    segments = segment_mask.shape[1]
    dims = torch.arange(tiny_backbone.spec.embed_dim)
    interleaved = segment_mask[:, dims % segments] == 0
    blocked = segment_mask[:, dims // (dims.numel() // segments)] == 0
    assert interleaved.any() and not torch.equal(interleaved, blocked)
    zeroed = package.prompts == 0  # [L, Np, D]; random prompts are never exactly zero
    assert torch.equal(zeroed, interleaved.expand_as(zeroed))


def test_row_isolation(small_backbone: Backbone) -> None:
    engine, _ = load_tasks(small_backbone)
    images = images_for(small_backbone, 8, seed=5)
    first = engine.forward(
        images, ["task-0", "task-1", "task-2", "task-3", "task-4", "task-5", "task-6", "task-0"]
    )
    order = [7, 6, 5, 4, 3, 2, 1, 0]
    swapped_ids = ["task-0", "task-6", "task-5", "task-4", "task-3", "task-2", "task-1", "task-0"]
    second = engine.forward(images[order], swapped_ids)
    for new_row, old_row in enumerate(order):
        assert torch.equal(second[new_row], first[old_row])
    # The same rows beside other companions (other tasks, other images) in a batch of the same size.
    companions = images_for(small_backbone, 8, seed=6)
    mixed = torch.cat([images[:4], companions[:4]])
    third = engine.forward(mixed, ["task-0", "task-1", "task-2", "task-3"] + ["task-6"] * 4)
    for row in range(4):
        assert torch.equal(third[row], first[row])


def test_unknown_task_is_named(tiny_backbone: Backbone) -> None:
    engine, _ = load_tasks(tiny_backbone)
    with pytest.raises(UnknownTaskError, match="nope"):
        engine.forward(images_for(tiny_backbone, 2), ["task-0", "nope"])


def test_bf16_error_against_fp32(small_backbone: Backbone) -> None:
    """bf16 stays close to fp32: the measured figures are printed for the docs."""
    engine, _ = load_tasks(small_backbone)
    half_backbone = Backbone.create(small_backbone.spec, "random", seed=11).to(dtype=torch.bfloat16)
    assert half_backbone.fingerprint == small_backbone.fingerprint
    half, _ = load_tasks(half_backbone)
    task_ids = [f"task-{i % len(SETTINGS)}" for i in range(32)]
    images = images_for(small_backbone, 32, seed=9)
    full = engine.forward(images, task_ids)
    low = half.forward(images, task_ids)
    errors = [relative_error(a, b) for a, b in zip(low, full, strict=True)]
    agree = sum(int(a.argmax() == b.argmax()) for a, b in zip(low, full, strict=True)) / len(full)
    median = sorted(errors)[len(errors) // 2]
    print(f"bf16 vs fp32: median relative error {median:.4f}, top-1 agreement {agree:.3f}")
    assert max(errors) < 0.1
    assert agree >= 0.8


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run; GPUs use the CUDA tests"
)
@pytest.mark.parametrize("kernel", ["triton", "cascade"])
def test_kernel_paths_equal_torch_path(kernel: str) -> None:
    pytest.importorskip("triton")
    backbone = Backbone.create(replace(TINY, num_heads=2, depth=1), "random", seed=3)  # head dim 32
    engine, _ = load_tasks(backbone)
    fused = Engine(backbone, engine.registry, attention=kernel)
    task_ids = ["task-0", "task-4", "task-6"]
    images = images_for(backbone, len(task_ids), seed=2)
    for plain, kernel in zip(engine.forward(images, task_ids), fused.forward(images, task_ids), strict=True):
        assert relative_error(kernel, plain) <= 1e-5

"""Batched task heads over the registry's paged tables: one product for a mixed batch, each row's logits
equal to its own head's and independent of its batch-mates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime import Backbone, TaskRegistry
from runtime.core.package import TaskPackage
from runtime.engines.heads import HeadTable, split
from tests.helpers import random_package

CLASS_COUNTS = (3, 10, 100, 37, 2, 17)


def loaded(
    backbone: Backbone, counts: tuple[int, ...] = CLASS_COUNTS
) -> tuple[TaskRegistry, list[TaskPackage]]:
    registry = TaskRegistry(backbone, initial_slots=2, initial_classes=4)  # grows while loading
    packages = [random_package(backbone, f"h{c}", seed=c, num_classes=c)[0] for c in counts]
    for package in packages:
        registry.add(package)
    return registry, packages


def linear(features: torch.Tensor, package: TaskPackage) -> torch.Tensor:
    return F.linear(features.float(), package.head_weight, package.head_bias)


def logits_of(registry: TaskRegistry, features: torch.Tensor, task_ids: list[str]) -> list[torch.Tensor]:
    entries = registry.snapshot.entries(task_ids)
    slots = torch.tensor([entry.slot for entry in entries], dtype=torch.int32)
    logits = HeadTable.of(registry.tables).apply(features, slots)
    assert logits.dtype == torch.float32 and logits.shape == (len(entries), registry.tables.classes)
    return split(logits, [entry.num_classes for entry in entries])


def test_matches_per_row_linear(tiny_backbone: Backbone) -> None:
    registry, packages = loaded(tiny_backbone)
    rows = [packages[(5 * i) % len(packages)] for i in range(9)]
    features = torch.randn(9, tiny_backbone.spec.embed_dim)
    logits = logits_of(registry, features, [p.task_id for p in rows])
    for row, (got, package) in enumerate(zip(logits, rows, strict=True)):
        assert got.shape == (package.num_classes,)
        torch.testing.assert_close(got, linear(features[row], package), atol=1e-6, rtol=1e-6)


def test_row_is_bit_identical_whatever_its_batch_mates(tiny_backbone: Backbone) -> None:
    registry, packages = loaded(tiny_backbone)
    gen = torch.Generator().manual_seed(1)
    row_features = torch.randn(tiny_backbone.spec.embed_dim, generator=gen)
    own, others = packages[1], packages[2:]
    (expected,) = logits_of(registry, row_features[None], [own.task_id])
    for batch in (2, 3, 8, 33, 64):
        features = torch.randn(batch, tiny_backbone.spec.embed_dim, generator=gen)
        position = batch // 2
        features[position] = row_features
        task_ids = [others[row % len(others)].task_id for row in range(batch)]
        task_ids[position] = own.task_id
        assert torch.equal(logits_of(registry, features, task_ids)[position], expected), batch


def test_reduced_precision_features_give_fp32_logits(tiny_backbone: Backbone) -> None:
    registry, packages = loaded(tiny_backbone, (5,))
    features = torch.randn(2, tiny_backbone.spec.embed_dim).to(torch.bfloat16)
    first, second = logits_of(registry, features, ["h5", "h5"])
    assert first.dtype == torch.float32
    torch.testing.assert_close(second, linear(features[1], packages[0]), atol=1e-6, rtol=1e-6)


def test_a_replaced_head_reads_its_new_rows(tiny_backbone: Backbone) -> None:
    registry, _ = loaded(tiny_backbone, (20, 3))
    narrower = random_package(tiny_backbone, "h20", seed=99, num_classes=4)[0]
    registry.add(narrower)
    features = torch.randn(1, tiny_backbone.spec.embed_dim)
    (got,) = logits_of(registry, features, ["h20"])
    torch.testing.assert_close(got, linear(features[0], narrower), atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_heads_fp32_bound() -> None:
    # On the GPU a row's logits may differ between batches only by fp32 rounding: tested bound
    # |diff| <= 1e-5 * max |logit| of the row, against float64 and against the row computed alone.
    from runtime.core.backbone import BackboneSpec

    spec = BackboneSpec(embed_dim=768, depth=1, num_heads=12, img_size=32, patch_size=16, name="heads-cuda")
    backbone = Backbone.create(spec, "random", seed=1).to("cuda")
    registry, packages = loaded(backbone, (10, 100, 1000, 37))
    rows = [packages[(7 * i) % 4] for i in range(256)]
    features = torch.randn(256, 768, device="cuda")
    logits = logits_of(registry, features, [p.task_id for p in rows])
    for row in (0, 1, 2, 3, 255):
        package = rows[row]
        weight, bias = package.head_weight.double().cuda(), package.head_bias.double().cuda()
        exact = F.linear(features[row].double(), weight, bias).cpu()
        (alone,) = logits_of(registry, features[row : row + 1], [package.task_id])
        bound = 1e-5 * exact.abs().max().item()
        torch.testing.assert_close(logits[row].double().cpu(), exact, atol=bound, rtol=0)
        torch.testing.assert_close(logits[row], alone, atol=bound, rtol=0)

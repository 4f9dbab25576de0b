"""Builders shared by tests: random tasks in the paper's settings and the paper's forward per row."""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.core.backbone import Backbone
from runtime.core.package import TaskPackage
from runtime.core.prompts import TaskPrompts
from runtime.paper.layout import to_paper_state_dict
from runtime.paper.reference import paper_forward


def random_prompts(backbone: Backbone, seed: int, **options) -> TaskPrompts:
    spec = backbone.spec
    settings = {"num_prompts": 10, "num_kv": 5, "num_classes": 7, **options}
    return TaskPrompts.random(spec.depth, spec.embed_dim, spec.num_heads, seed=seed, **settings)


def random_package(
    backbone: Backbone, task_id: str, seed: int, labels: list[str] | None = None, **options
) -> tuple[TaskPackage, TaskPrompts]:
    """The tests' one task builder: seeded random prompts (``options`` go to TaskPrompts.random)."""
    prompts = random_prompts(backbone, seed, **options)
    return TaskPackage.from_prompts(task_id, prompts, backbone, labels=labels), prompts


def reference_logits(backbone: Backbone, prompts: TaskPrompts, images: Tensor) -> Tensor:
    state = to_paper_state_dict(backbone.model.state_dict(), prompts)
    return paper_forward(state, images, backbone.spec.num_heads)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def images_for(backbone: Backbone, count: int, seed: int = 0) -> Tensor:
    size = backbone.spec.img_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))

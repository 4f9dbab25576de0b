"""Validation before writing: the packaged task on the runtime vs the paper's forward of the checkpoint."""

from __future__ import annotations

import torch
from torch import Tensor

from exporter.checkpoint import LoadedTask
from runtime.core.backbone import Backbone
from runtime.core.package import TaskPackage
from runtime.core.registry import TaskRegistry
from runtime.engines.torch_engine import Engine
from runtime.paper.layout import to_paper_state_dict
from runtime.paper.reference import paper_forward


def reference_state(task: LoadedTask, backbone: Backbone) -> dict[str, Tensor]:
    """The original model in the paper's layout: the checkpoint itself, or the backbone plus prompts."""
    if task.paper_state is not None:
        return task.paper_state
    return to_paper_state_dict(backbone.model.state_dict(), task.prompts)


def relative_error(got: Tensor, want: Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude."""
    scale = want.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((got.float() - want.float()).abs().max() / scale)


def validation_error(
    package: TaskPackage,
    backbone: Backbone,
    reference: dict[str, Tensor],
    images: int = 2,
    seed: int = 0,
) -> float:
    """Relative error of the runtime's logits for ``images`` seeded random inputs against the reference."""
    size = backbone.spec.img_size
    inputs = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    registry = TaskRegistry(backbone, initial_slots=1)
    registry.add(package)
    engine = Engine(backbone, registry, attention="torch")
    got = torch.stack(engine.forward(inputs, [package.task_id] * images))
    want = paper_forward(reference, inputs, backbone.spec.num_heads)
    return relative_error(got, want)

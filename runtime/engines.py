"""Engine selection by name: every engine runs the same mixed-task batches with the same outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import Tensor

from runtime.backbone import Backbone
from runtime.registry import Snapshot, TaskRegistry

ENGINES = ("torch", "onnxruntime")


class InferenceEngine(Protocol):
    backbone: Backbone
    registry: TaskRegistry

    def forward(self, images: Tensor, task_ids: Sequence[str]) -> list[Tensor]: ...

    def forward_snapshot(
        self, snapshot: Snapshot, images: Tensor, task_ids: Sequence[str]
    ) -> list[Tensor]: ...


def make_engine(name: str, backbone: Backbone, registry: TaskRegistry, **options: Any) -> InferenceEngine:
    """``torch`` (options: ``attention``) or ``onnxruntime`` (options: see ``runtime.onnx_engine``)."""
    if name == "torch":
        from runtime.engine import Engine

        return Engine(backbone, registry, **options)
    if name == "onnxruntime":
        from runtime.onnx_engine import OnnxEngine

        return OnnxEngine(backbone, registry, **options)
    raise ValueError(f"unknown engine {name!r}; choose from {ENGINES}")

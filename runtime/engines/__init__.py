"""Engines: the frozen ViT run with a per-row task prefix (PyTorch, ONNX Runtime), built by name."""

from __future__ import annotations

from pathlib import Path

from runtime.core.backbone import Backbone
from runtime.core.registry import TaskRegistry
from runtime.engines.base import InferenceEngine
from runtime.engines.torch_engine import Engine

ENGINES = ("torch", "onnxruntime")

__all__ = ["ENGINES", "Engine", "InferenceEngine", "make_engine"]


def make_engine(
    name: str,
    backbone: Backbone,
    registry: TaskRegistry | None = None,
    *,
    attention: str = "auto",
    onnx_path: str | Path | None = None,
    threads: int | None = None,
) -> InferenceEngine:
    """The one engine factory: ``torch`` or ``onnxruntime`` over ``backbone`` and ``registry``.

    ``attention`` is the torch engine's backend; ``onnx_path`` (exported at start when None) and
    ``threads`` are ONNX Runtime's. The torch engine's intra-op threads belong to whoever computes
    (the batcher or ``classify``), not to the engine.
    """
    registry = registry if registry is not None else TaskRegistry(backbone)
    if name == "torch":
        return Engine(backbone, registry, attention=attention)
    if name == "onnxruntime":
        from runtime.engines.onnxruntime_engine import OnnxEngine  # imports onnxruntime: only when asked

        return OnnxEngine(backbone, registry, onnx_path=onnx_path, threads=threads)
    raise ValueError(f"unknown engine {name!r}; choose from {ENGINES}")

"""Engines: the frozen ViT run with a per-row task prefix (PyTorch, ONNX Runtime), built by name."""

from __future__ import annotations

from pathlib import Path

from runtime.core.backbone import Backbone
from runtime.core.registry import TaskRegistry
from runtime.engines.base import InferenceEngine
from runtime.engines.graphs import CudaGraphCapture
from runtime.engines.torch_engine import DEFAULT_MAX_BATCH_SIZE, Engine

ENGINES = ("torch", "onnxruntime")

__all__ = ["ENGINES", "Engine", "InferenceEngine", "make_engine"]


def make_engine(
    name: str,
    backbone: Backbone,
    registry: TaskRegistry | None = None,
    *,
    attention: str = "auto",
    cuda_graphs: bool = False,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    onnx_path: str | Path | None = None,
    threads: int | None = None,
) -> InferenceEngine:
    """The one engine factory: ``torch`` or ``onnxruntime`` over ``backbone`` and ``registry``.

    ``attention`` is the torch engine's backend, ``cuda_graphs`` its graphs of batches up to
    ``max_batch_size`` (captured by ``warm_up``); ``onnx_path`` (exported at start when None) and
    ``threads`` are ONNX Runtime's. The torch engine's intra-op threads belong to whoever computes
    (the batcher or ``classify``), not to the engine.
    """
    registry = registry if registry is not None else TaskRegistry(backbone)
    if name == "torch":
        graphs = CudaGraphCapture() if cuda_graphs else None
        return Engine(backbone, registry, attention=attention, graphs=graphs, max_batch_size=max_batch_size)
    if name == "onnxruntime":
        if cuda_graphs:
            raise ValueError("CUDA graphs are a torch engine option")
        from runtime.engines.onnxruntime_engine import OnnxEngine  # imports onnxruntime: only when asked

        return OnnxEngine(backbone, registry, onnx_path=onnx_path, threads=threads)
    raise ValueError(f"unknown engine {name!r}; choose from {ENGINES}")

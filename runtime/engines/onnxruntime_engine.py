"""The ONNX Runtime engine: the exported backbone graph, each row's prefix fed as inputs.

Per batch the engine gathers every row's prefix from the snapshot's slot tables (trimmed to the
longest prefix of any loaded task, so a row's output never depends on its companions), runs the
session for pooled features, and applies each row's head in PyTorch exactly as
:class:`runtime.engines.torch_engine.Engine` does.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from runtime.core.backbone import Backbone, BackboneSpec
from runtime.core.plan import PrefixPlan
from runtime.core.registry import TaskRegistry
from runtime.engines.base import InferenceEngine
from runtime.engines.onnx_graph import FORMAT_NAME, FORMAT_VERSION, INPUT_NAMES, export_model

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class OnnxEngineError(ValueError):
    """An ONNX backbone file that is missing, unreadable, or made for another backbone."""


def default_providers() -> list[str]:
    """CUDA (then CPU) when onnxruntime-gpu is installed and a GPU is present, else CPU."""
    if CUDA in ort.get_available_providers() and torch.cuda.is_available():
        return [CUDA, CPU]
    return [CPU]


def session_options(
    threads: int | None = None, save_optimized: str | Path | None = None
) -> ort.SessionOptions:
    """All graph optimizations on; ``threads`` intra-op threads (ONNX Runtime picks when None)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    if save_optimized is not None:
        options.optimized_model_filepath = str(save_optimized)
        # Saving at the full level warns that NCHWc kernels are hardware-specific; the docs say so.
        options.log_severity_level = 3
    return options


class OnnxEngine(InferenceEngine):
    """Runs mixed-task batches through an ONNX Runtime session of the exported backbone.

    ``onnx_path`` is a file from ``python -m exporter onnx``; without one the backbone is exported
    in memory at start-up. ``save_optimized`` writes the session's optimized graph (it may hold
    hardware-specific kernels: use it on the machine that wrote it).
    """

    def __init__(
        self,
        backbone: Backbone,
        registry: TaskRegistry | None = None,
        onnx_path: str | Path | None = None,
        threads: int | None = None,
        providers: Sequence[str] | str | None = None,
        save_optimized: str | Path | None = None,
    ) -> None:
        self.backbone = backbone
        self.registry = registry if registry is not None else TaskRegistry(backbone)
        self.path = Path(onnx_path) if onnx_path is not None else None
        if isinstance(providers, str):
            providers = [name.strip() for name in providers.split(",") if name.strip()]
        providers = list(providers) if providers else default_providers()
        unavailable = [name for name in providers if name not in ort.get_available_providers()]
        if unavailable:
            raise OnnxEngineError(
                f"execution providers {unavailable} are not available; "
                f"this onnxruntime has {ort.get_available_providers()}"
            )
        self.session = self._open(threads, providers, save_optimized)
        self._check_backbone()
        self.providers = self.session.get_providers()

    @property
    def _name(self) -> str:
        return f"ONNX backbone {self.path}" if self.path is not None else "in-memory ONNX backbone"

    def _open(
        self, threads: int | None, providers: list[str], save_optimized: str | Path | None
    ) -> ort.InferenceSession:
        if self.path is None:
            source: str | bytes = export_model(self.backbone).SerializeToString()
        elif not self.path.is_file():
            raise OnnxEngineError(f"{self._name}: no such file")
        else:
            source = str(self.path)
        temporary, target = None, None
        if save_optimized is not None:
            target = Path(save_optimized)
            target.parent.mkdir(parents=True, exist_ok=True)
            # ONNX Runtime writes the file itself; a temp name in the same folder keeps it atomic.
            fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
        try:
            session = ort.InferenceSession(source, session_options(threads, temporary), providers=providers)
            if temporary is not None and target is not None:
                os.replace(temporary, target)
        except Exception as error:  # onnxruntime raises its own types for unreadable or invalid models
            raise OnnxEngineError(f"{self._name}: not a readable ONNX model ({error})") from error
        finally:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
        return session

    def _check_backbone(self) -> None:
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != FORMAT_NAME or meta.get("format_version") != str(FORMAT_VERSION):
            raise OnnxEngineError(
                f"{self._name}: not an exported e2vpt-serve backbone (metadata format "
                f"{meta.get('format')!r} version {meta.get('format_version')!r}, expected "
                f"{FORMAT_NAME!r} version {FORMAT_VERSION}); export it with `python -m exporter onnx`"
            )
        recorded = meta.get("backbone_fingerprint", "")
        if recorded != self.backbone.fingerprint:
            raise OnnxEngineError(
                f"{self._name} was exported from backbone {recorded}, "
                f"but the loaded backbone is {self.backbone.fingerprint}"
            )
        spec = BackboneSpec.from_dict(json.loads(meta["backbone_spec"]))
        if spec != self.backbone.spec:
            raise OnnxEngineError(
                f"{self._name}: spec {spec} differs from the backbone's {self.backbone.spec}"
            )
        names = tuple(node.name for node in self.session.get_inputs())
        if names != INPUT_NAMES:
            raise OnnxEngineError(f"{self._name}: graph inputs {names}, expected {INPUT_NAMES}")

    def features(self, plan: PrefixPlan, images: Tensor) -> Tensor:
        """Final-norm CLS features ``[B, D]`` (fp32, CPU) from the session."""
        (features,) = self.session.run(None, self.inputs(plan, images))
        return torch.from_numpy(features)

    def inputs(self, plan: PrefixPlan, images: Tensor) -> dict[str, np.ndarray]:
        """The graph's inputs for one batch: each row's prefix for every layer, and its mask."""
        keys, values = plan.gather_layers()
        return {
            "pixels": _numpy(images),
            "prefix_keys": _numpy(keys),
            "prefix_values": _numpy(values),
            "prefix_mask": _numpy(plan.mask(0, torch.float32).view(len(plan.rows), plan.longest_prefix)),
        }


def _numpy(tensor: Tensor) -> np.ndarray:
    """fp32, C-contiguous, on CPU: zero-copy when the tensor already is."""
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()

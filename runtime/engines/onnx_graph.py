"""The exportable backbone graph: pixels and per-row prefix data in, pooled features out.

Heads stay in the runtime; the prefix of each row is an input, so one graph serves every task.
The graph is the traced :class:`~runtime.engines.prefix_vit.PrefixViT` forward, the same the torch
engine runs, with the exportable backend (:func:`~runtime.engines.attention.bind_rows`): plain
MatMul / Add / Softmax over ``[prefix ; tokens]``, the computation of ``bind_torch``.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections import Counter

import onnx
import torch
from torch import Tensor

from runtime.core.backbone import Backbone
from runtime.engines.attention import bind_rows
from runtime.engines.prefix_vit import PrefixViT

FORMAT_NAME = "e2vpt-serve-backbone-onnx"
FORMAT_VERSION = 1
DEFAULT_OPSET = 17
PROTOBUF_LIMIT = 2**31  # a serialized ONNX model (weights inside) must stay below this
# Operators that stand for fused subgraphs (the export summary counts them).
FUSED_OPERATORS = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "Attention",
    "MultiHeadAttention",
    "FusedMatMul",
    "FusedGemm",
    "FusedConv",
)
INPUT_NAMES = ("pixels", "prefix_keys", "prefix_values", "prefix_mask")
OUTPUT_NAMES = ("features",)
DYNAMIC_AXES = {
    "pixels": {0: "batch"},
    "prefix_keys": {1: "batch", 3: "prefix"},
    "prefix_values": {1: "batch", 3: "prefix"},
    "prefix_mask": {0: "batch", 1: "prefix"},
    "features": {0: "batch"},
}


class OnnxPrefixViT(PrefixViT):
    """The shared prefix forward with each row's prefix as graph inputs (:func:`bind_rows`).

    Inputs: ``pixels [B, 3, S, S]``, ``prefix_keys``/``prefix_values [L, B, H, P, d]``,
    ``prefix_mask [B, P]`` (additive: the prefix bias on valid slots, ``-inf`` on padding).
    Output: final-norm CLS features ``[B, D]``.
    """

    def forward(
        self, pixels: Tensor, prefix_keys: Tensor, prefix_values: Tensor, prefix_mask: Tensor
    ) -> Tensor:
        attend = bind_rows(prefix_keys, prefix_values, prefix_mask, self.num_tokens, self.head_dim)
        return self.features(pixels, attend)


def export_model(backbone: Backbone, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Trace ``OnnxPrefixViT`` (TorchScript exporter) with dynamic batch and prefix length, and stamp it."""
    if backbone.dtype != torch.float32:
        raise ValueError(f"ONNX export needs the fp32 backbone, this one is {backbone.dtype}")
    model = backbone.model
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weight_bytes >= PROTOBUF_LIMIT:
        raise ValueError(
            f"backbone {backbone.spec.name} has {weight_bytes / 2**30:.1f} GiB of weights; one-file ONNX "
            f"export is limited to {PROTOBUF_LIMIT / 2**30:.0f} GiB (protobuf)"
        )
    if backbone.device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    spec = backbone.spec
    batch, prefix = 2, 3  # sizes above 1 so the tracer cannot specialise the dynamic axes
    prefix_shape = (spec.depth, batch, spec.num_heads, prefix, spec.head_dim)
    example = (
        torch.zeros(batch, 3, spec.img_size, spec.img_size),
        torch.zeros(prefix_shape),
        torch.zeros(prefix_shape),
        torch.zeros(batch, prefix),
    )
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter announces its deprecation; timm's image-size assert is traced as a
        # constant, which is right for a fixed-resolution backbone.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            OnnxPrefixViT(model).eval(),
            example,
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=DYNAMIC_AXES,
            opset_version=opset,
            dynamo=False,
        )
    exported = onnx.load_from_string(buffer.getvalue())
    stamp(exported, backbone)
    return exported


def stamp(model: onnx.ModelProto, backbone: Backbone) -> None:
    """Record the format and the backbone (fingerprint, spec) in the graph's metadata."""
    props = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "backbone_fingerprint": backbone.fingerprint,
        "backbone_spec": json.dumps(backbone.spec.to_dict(), sort_keys=True),
        "backbone_source": backbone.source,
    }
    kept = [prop for prop in model.metadata_props if prop.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def fuse_transformer(model: onnx.ModelProto, backbone: Backbone) -> onnx.ModelProto:
    """ONNX Runtime's offline transformer fusions (SkipLayerNormalization, BiasGelu), re-stamped.

    Its attention fusion does not apply: each layer's keys are ``[prefix ; tokens]``, not one sequence.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    spec = backbone.spec
    optimized = optimize_model(
        model, model_type="vit", num_heads=spec.num_heads, hidden_size=spec.embed_dim, opt_level=0
    ).model
    stamp(optimized, backbone)
    return optimized


def operator_counts(model: onnx.ModelProto, names: tuple[str, ...] = FUSED_OPERATORS) -> dict[str, int]:
    """Nodes per fused operator: those in ``names`` and every ONNX Runtime contrib op (zeros left out).

    Ops of a sub-domain are named with it, e.g. ``nchwc:Conv`` for the blocked-layout convolution.
    """
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        domain = node.domain or ""
        if domain.startswith("com.microsoft."):
            counts[f"{domain.removeprefix('com.microsoft.')}:{node.op_type}"] += 1
        elif node.op_type in names or domain == "com.microsoft":
            counts[node.op_type] += 1
    return dict(sorted(counts.items()))

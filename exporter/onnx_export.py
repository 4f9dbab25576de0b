"""``python -m exporter onnx``: the frozen backbone as one ONNX graph with per-row prefixes as inputs.

The graph takes ``pixels [B, 3, S, S]``, ``prefix_keys``/``prefix_values [L, B, H, P, d]`` and an
additive ``prefix_mask [B, P]`` (B and P dynamic) and returns pooled features ``[B, D]``; task heads
stay in the runtime. The file's metadata records the backbone fingerprint and spec, which
``--engine onnxruntime`` checks before serving.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from exporter.backbone import read_backbone_spec
from exporter.checkpoint import ExportError
from exporter.cli import clean_stale_temporaries
from runtime.core.backbone import ARCHITECTURES, RANDOM_WEIGHTS, Backbone, BackboneError, BackboneSpec
from runtime.core.files import atomic_write
from runtime.engines.onnx_graph import (
    DEFAULT_OPSET,
    OnnxPrefixViT,
    export_model,
    fuse_transformer,
    operator_counts,
)
from runtime.engines.onnxruntime_engine import session_options

PROG = "python -m exporter onnx"
# Parity of the exported graph with PyTorch on a random batch, fp32.
VALIDATION_TOLERANCE = 1e-4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Export the frozen backbone as one ONNX graph: inputs are the pixel batch and each row's "
            "prefix (keys/values per layer and an additive mask holding the prefix bias), output is the "
            "pooled feature. Batch size and prefix length are dynamic. The file records the backbone "
            "fingerprint; the runtime refuses it for any other backbone. The graph is checked against "
            "PyTorch on a random batch before it is written."
        ),
        epilog="Exit status: 0 when the file was written, 1 on any error, 2 on a usage error.",
    )
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument(
        "--backbone",
        metavar="NAME",
        choices=sorted(ARCHITECTURES),
        help=f"named architecture ({', '.join(sorted(ARCHITECTURES))}); default: the spec recorded in "
        "the weights file's header (from `python -m exporter backbone`)",
    )
    shape.add_argument(
        "--spec",
        metavar="JSON",
        help='custom architecture as BackboneSpec fields, e.g. \'{"embed_dim": 64, "depth": 2, '
        '"num_heads": 4, "img_size": 32, "patch_size": 8, "name": "tiny"}\'',
    )
    parser.add_argument(
        "--weights",
        required=True,
        metavar="FILE|random",
        help="backbone weights (safetensors or a weights-only torch state dict), or 'random' for "
        "seeded random weights (demos and tests; not pretrained)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for --weights random (default: 0)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="ONNX file to write")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET}, minimum 17)"
    )
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="also apply ONNX Runtime's offline transformer fusions (SkipLayerNormalization, BiasGelu) "
        "to the written graph; the session fuses further at load time either way",
    )
    parser.add_argument(
        "--save-optimized",
        metavar="FILE",
        help="also write the graph as an ONNX Runtime CPU session optimizes it (all optimizations on; "
        "may hold hardware-specific kernels, so use it on this machine only)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads for the check (default: ONNX Runtime's)"
    )
    return parser


def resolve_spec(args: argparse.Namespace) -> BackboneSpec:
    if args.backbone:
        return BackboneSpec.named(args.backbone)
    if args.spec:
        try:
            fields = json.loads(args.spec)
        except json.JSONDecodeError as error:
            raise BackboneError(f"--spec is not valid JSON ({error})") from error
        if not isinstance(fields, dict):
            raise BackboneError("--spec must be a JSON object of BackboneSpec fields")
        return BackboneSpec.from_dict(fields)
    if args.weights != RANDOM_WEIGHTS:
        recorded = read_backbone_spec(args.weights)
        if recorded is not None:
            return recorded
    raise BackboneError("no architecture: pass --backbone NAME or --spec JSON")


def validation_error(model: onnx.ModelProto, backbone: Backbone, threads: int | None) -> float:
    """Max relative difference of ONNX Runtime vs PyTorch on two rows, one with a padded prefix slot."""
    spec = backbone.spec
    generator = torch.Generator().manual_seed(0)
    prefix_shape = (spec.depth, 2, spec.num_heads, 3, spec.head_dim)
    pixels = torch.randn(2, 3, spec.img_size, spec.img_size, generator=generator)
    keys = torch.randn(prefix_shape, generator=generator)
    values = torch.randn(prefix_shape, generator=generator)
    mask = torch.tensor([[0.0, 0.7, 0.0], [0.0, 0.0, float("-inf")]])
    with torch.inference_mode():
        expected = OnnxPrefixViT(backbone.model)(pixels, keys, values, mask)
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
    )
    feeds = {"pixels": pixels, "prefix_keys": keys, "prefix_values": values, "prefix_mask": mask}
    (actual,) = session.run(None, {name: tensor.numpy() for name, tensor in feeds.items()})
    return float(np.abs(actual - expected.numpy()).max() / np.abs(expected.numpy()).max())


def session_operator_counts(model: onnx.ModelProto, threads: int | None, save_optimized: str | None) -> dict:
    """Fused-operator counts in the graph as an ONNX Runtime CPU session optimizes it (optionally saved)."""
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        ort.InferenceSession(
            model.SerializeToString(), session_options(threads, optimized), providers=["CPUExecutionProvider"]
        )
        if save_optimized:
            atomic_write(Path(save_optimized), optimized.read_bytes)
        return operator_counts(onnx.load(str(optimized)))


def describe_counts(counts: dict) -> str:
    return ", ".join(f"{name} x{count}" for name, count in counts.items()) or "none"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.opset < DEFAULT_OPSET:
        print(f"error: --opset {args.opset} is below {DEFAULT_OPSET} (LayerNormalization)", file=sys.stderr)
        return 2
    clean_stale_temporaries(Path(args.output).parent)
    try:
        spec = resolve_spec(args)
        backbone = Backbone.create(spec, args.weights, seed=args.seed)
        model = export_model(backbone, opset=args.opset)
        if args.optimize:
            model = fuse_transformer(model, backbone)
        deviation = validation_error(model, backbone, args.threads)
        if not deviation <= VALIDATION_TOLERANCE:
            print(
                f"error: exported graph differs from PyTorch by {deviation:.2e} "
                f"(> {VALIDATION_TOLERANCE:.0e}); nothing written",
                file=sys.stderr,
            )
            return 1
        session_counts = session_operator_counts(model, args.threads, args.save_optimized)
        path = atomic_write(Path(args.output), model.SerializeToString)
    except (BackboneError, ExportError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, opset {args.opset})")
    print(f"backbone {spec.name}: fingerprint {backbone.fingerprint} ({backbone.source})")
    print(f"validation: max relative error vs PyTorch {deviation:.2e}")
    print(f"fused operators in the file: {describe_counts(operator_counts(model))}")
    print(f"fused operators after ONNX Runtime CPU session optimization: {describe_counts(session_counts)}")
    if args.save_optimized:
        print(f"wrote the session-optimized graph to {args.save_optimized}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

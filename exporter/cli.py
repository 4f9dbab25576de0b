"""``python -m exporter``: training checkpoints in, validated task packages out (and backbone extraction)."""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from exporter.backbone import extract_backbone, resolve_backbone
from exporter.checkpoint import ExportError, LoadedTask, read_checkpoint
from exporter.validate import reference_state, validation_error
from runtime.core.backbone import ARCHITECTURES, Backbone
from runtime.core.files import remove_stale_temporaries
from runtime.core.package import (
    PACKAGE_SUFFIX,
    RESIZE_POLICIES,
    TASK_ID_PATTERN,
    PackageError,
    Preprocess,
    TaskPackage,
)
from runtime.core.prompts import DEFAULT_SEGMENTS

DEFAULT_TOLERANCE = 1e-4
DEFAULT_VALIDATION_IMAGES = 2
PROG = "python -m exporter"
USAGE = f"""{PROG} CHECKPOINT [CHECKPOINT ...] [-o OUT] [options]   (write task packages)
       {PROG} backbone CHECKPOINT [-o BACKBONE.safetensors]    (extract the backbone; see --help there)
       {PROG} onnx ...                                         (ONNX export; see {PROG} onnx --help)"""


@dataclass
class ExportResult:
    """One written package and the numbers its summary line reports."""

    package: TaskPackage
    path: Path
    error: float

    def summary(self) -> str:
        package = self.package
        params = package.metadata()["parameters"]
        kv = "shared" if package.kv_shared else "separate"
        return (
            f"{package.task_id}: prompts kept {package.num_kept}/pruned {package.num_pruned} per layer, "
            f"KV prompts {package.num_kv} ({kv}), classes {package.num_classes}, "
            f"parameters {params['task']:,} ({params['share_of_backbone']:.3%} of backbone), "
            f"bytes {package.tensor_bytes:,}, validation error {self.error:.2e} -> {self.path}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=USAGE,
        description=(
            "Package E2VPT prompts from training checkpoints as task packages for the runtime. Reads the "
            "paper code's checkpoint ({'model': state_dict}, backbone inside) or the native format "
            "(docs/native-checkpoint.md); applies pruning, runs the packaged task against the paper's "
            "forward of the checkpoint and writes the package only if they agree. Torch files are read "
            "weights-only: pickled code is never executed."
        ),
        epilog="Exit status: 0 when every checkpoint was written, 1 on any error, 2 on a usage error.",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="training checkpoint file(s)")
    parser.add_argument(
        "-o",
        "--output",
        help=f"output file (one checkpoint) or directory (several, or a path ending in '/'); "
        f"default: ./<task-id>{PACKAGE_SUFFIX}",
    )
    parser.add_argument(
        "--task-id", help="task id (one checkpoint only); default: the checkpoint's file name without suffix"
    )
    parser.add_argument("--labels", metavar="FILE", help="class labels, one per line, in head order")
    masks = parser.add_argument_group("pruning masks (paper checkpoints; one checkpoint only)")
    masks.add_argument(
        "--token-mask",
        metavar="FILE",
        help='JSON from the pruning stage, {"N": [pruned token ids]}; replaces the checkpoint\'s token mask',
    )
    masks.add_argument(
        "--segment-mask",
        metavar="FILE",
        help='JSON from the pruning stage, {"token id": [pruned segment ids]}; replaces the segment mask',
    )
    masks.add_argument(
        "--segments",
        type=int,
        default=DEFAULT_SEGMENTS,
        help="segments per token for --segment-mask when the checkpoint holds no segment mask "
        f"(default {DEFAULT_SEGMENTS})",
    )
    backbone = parser.add_argument_group("backbone")
    backbone.add_argument(
        "--backbone",
        metavar="FILE",
        help="timm-layout backbone weights: checked against a paper checkpoint's own backbone "
        "(error if they differ); required for native checkpoints ('random' = seeded random weights, demos)",
    )
    backbone.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        metavar="NAME",
        help="named architecture: the backbone of a native checkpoint, or the name recorded for a paper "
        f"one ({', '.join(sorted(ARCHITECTURES))})",
    )
    backbone.add_argument(
        "--num-heads", type=int, help="attention heads, when a paper checkpoint has no KV prompts to tell"
    )
    backbone.add_argument("--seed", type=int, default=0, help="seed for --backbone random (default 0)")
    validation = parser.add_argument_group("validation")
    validation.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest relative error accepted against the paper's forward (default {DEFAULT_TOLERANCE:g})",
    )
    validation.add_argument(
        "--validation-images",
        type=int,
        default=DEFAULT_VALIDATION_IMAGES,
        help=f"seeded random inputs to validate with (default {DEFAULT_VALIDATION_IMAGES})",
    )
    pre = parser.add_argument_group("preprocessing recorded in the package (default: ImageNet, 0.875 crop)")
    pre.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="normalisation mean")
    pre.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="normalisation std")
    pre.add_argument("--crop-pct", type=float, help="center-crop fraction")
    pre.add_argument("--resize", choices=RESIZE_POLICIES, help="resize policy")
    pre.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest"), help="resize filter")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Export every checkpoint; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    several = len(args.checkpoints) > 1
    for option in ("task_id", "token_mask", "segment_mask"):
        if several and getattr(args, option) is not None:
            parser.error(f"--{option.replace('_', '-')} applies to one checkpoint; give one checkpoint")
    if args.validation_images < 1 or args.tolerance <= 0:
        parser.error("--validation-images must be >= 1 and --tolerance > 0")
    try:
        task_ids = [args.task_id or task_id_from_path(Path(c)) for c in args.checkpoints]
        outputs = output_paths(task_ids, args.output, several)
        labels = read_labels(args.labels) if args.labels else None
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for directory in sorted({output.parent for output in outputs}):
        clean_stale_temporaries(directory)
    failed = 0
    progress = tqdm(
        list(zip(args.checkpoints, task_ids, outputs, strict=True)),
        desc="export",
        unit="ckpt",
        file=sys.stderr,
        disable=True if not several else None,
    )
    for checkpoint, task_id, output in progress:
        try:
            result = export_task(Path(checkpoint), task_id, output, args, labels)
        except ExportError as error:
            failed += 1
            tqdm.write(f"error: {error}", file=sys.stderr)
            continue
        tqdm.write(result.summary(), file=sys.stdout)
    return 1 if failed else 0


def export_task(
    checkpoint: Path, task_id: str, output: Path, args: argparse.Namespace, labels: list[str] | None
) -> ExportResult:
    """Read, prune, validate and (only if valid) write one task package."""
    task = read_checkpoint(
        checkpoint,
        token_mask=args.token_mask,
        segment_mask=args.segment_mask,
        segments=args.segments,
        num_heads=args.num_heads,
        arch=args.arch,
    )
    backbone = resolve_backbone(task, args.backbone, args.arch, args.seed)
    if labels is not None and len(labels) != task.prompts.head_weight.shape[0]:
        raise ExportError(
            f"{args.labels}: {len(labels)} labels for the {task.prompts.head_weight.shape[0]} classes of "
            f"{checkpoint} (head weight {list(task.prompts.head_weight.shape)})"
        )
    provenance = {
        "exporter": "e2vpt-serve exporter",
        "checkpoint": checkpoint.name,
        "checkpoint_format": task.kind,
        **task.provenance,
    }
    try:
        package = TaskPackage.from_prompts(
            task_id,
            task.prompts,
            backbone,
            labels=labels if labels is not None else task.labels,
            preprocess=_preprocess(task, backbone, args),
            provenance=provenance,
        )
    except (PackageError, ValueError) as error:
        raise ExportError(f"{checkpoint}: {error}") from error
    deviation = validation_error(package, backbone, reference_state(task, backbone), args.validation_images)
    if not deviation <= args.tolerance:
        raise ExportError(
            f"{checkpoint}: validation failed: the packaged task differs from the checkpoint's reference "
            f"forward by relative error {deviation:.3e} (tolerance {args.tolerance:.1e}); nothing written"
        )
    package.provenance["validation"] = {
        "relative_error": deviation,
        "tolerance": args.tolerance,
        "images": args.validation_images,
        "reference": "paper forward of the checkpoint, fp32",
    }
    package.save(output)
    return ExportResult(package=package, path=output, error=deviation)


def _preprocess(task: LoadedTask, backbone: Backbone, args: argparse.Namespace) -> Preprocess:
    base = task.preprocess or Preprocess()
    changes = {
        "mean": tuple(args.mean) if args.mean else None,
        "std": tuple(args.std) if args.std else None,
        "crop_pct": args.crop_pct,
        "resize": args.resize,
        "interpolation": args.interpolation,
    }
    pre = replace(
        base, input_size=backbone.spec.img_size, **{k: v for k, v in changes.items() if v is not None}
    )
    try:
        return Preprocess.from_dict(pre.to_dict())
    except PackageError as error:
        raise ExportError(f"preprocessing options: {error}") from error


def task_id_from_path(path: Path) -> str:
    """The file name without suffix, with characters a task id cannot hold replaced by '-'."""
    task_id = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).lstrip("_.-")[:128]
    if not TASK_ID_PATTERN.match(task_id):
        raise ExportError(f"{path}: no task id can be made from the file name; pass --task-id")
    return task_id


def output_paths(task_ids: list[str], output: str | None, several: bool) -> list[Path]:
    """One output file per task: ``OUT`` itself for one task, ``OUT/<task id>.safetensors`` otherwise."""
    duplicates = sorted({t for t in task_ids if task_ids.count(t) > 1})
    if duplicates:
        raise ExportError(f"several checkpoints would get the task id(s) {duplicates}: rename the files")
    if output is not None and not several and not output.endswith("/") and not Path(output).is_dir():
        if not output.endswith(PACKAGE_SUFFIX):
            raise ExportError(f"{output}: a task package file must end with {PACKAGE_SUFFIX}")
        return [Path(output)]
    directory = Path(output) if output is not None else Path.cwd()
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory}: not a directory (several checkpoints need an output directory)")
    return [directory / f"{task_id}{PACKAGE_SUFFIX}" for task_id in task_ids]


def read_labels(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ExportError(f"{path}: cannot read labels: {error}") from error
    labels = [line.strip() for line in lines if line.strip()]
    if not labels:
        raise ExportError(f"{path}: no labels (expected one label per line)")
    return labels


def build_backbone_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} backbone",
        description=(
            "Extract the frozen backbone of a paper-code checkpoint into timm's VisionTransformer layout "
            "(Q, K, V fused into qkv, LayerNorm eps 1e-6) as safetensors, and print its fingerprint: the "
            "one the task packages exported from that checkpoint record."
        ),
        epilog="Exit status: 0 on success, 1 on any error, 2 on a usage error.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="paper-code checkpoint (last_model.pth)")
    parser.add_argument(
        "-o", "--output", help="output .safetensors file (default: ./<checkpoint name>-backbone.safetensors)"
    )
    parser.add_argument(
        "--num-heads", type=int, help="attention heads, when the checkpoint has no KV prompts to tell"
    )
    parser.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        metavar="NAME",
        help=f"named architecture to record ({', '.join(sorted(ARCHITECTURES))})",
    )
    return parser


def backbone_main(argv: Sequence[str] | None = None) -> int:
    args = build_backbone_parser().parse_args(argv)
    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else Path.cwd() / f"{checkpoint.stem}-backbone.safetensors"
    clean_stale_temporaries(output.parent)
    try:
        backbone = extract_backbone(checkpoint, output, num_heads=args.num_heads, arch=args.arch)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    spec = backbone.spec
    print(
        f"{output}: {spec.name} (width {spec.embed_dim}, {spec.depth} layers, {spec.num_heads} heads, "
        f"patch {spec.patch_size}, {spec.img_size} px)"
    )
    print(f"fingerprint {backbone.fingerprint}")
    return 0


def clean_stale_temporaries(directory: Path) -> None:
    """Remove what killed exports left in ``directory`` (an exporter killed mid-write cannot clean up)."""
    for path in remove_stale_temporaries(directory):
        print(f"removed a stale temporary file of an interrupted export: {path}", file=sys.stderr)


def exit_on_termination() -> None:
    """Make SIGTERM unwind like Ctrl-C: a write in progress then removes its temporary file."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def dispatch(argv: Sequence[str] | None = None) -> int:
    """``backbone`` and ``onnx`` select those commands; anything else is a task export."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["backbone"]:
        return backbone_main(argv[1:])
    if argv[:1] == ["onnx"]:
        from exporter.onnx_export import main as onnx_main

        return onnx_main(argv[1:])
    return main(argv)

"""Task package v1: one safetensors file per task (tensors + JSON metadata). Spec: docs/task-package.md."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from runtime.core.backbone import Backbone, BackboneSpec
from runtime.core.files import atomic_write
from runtime.core.prompts import TaskPrompts

FORMAT_NAME = "e2vpt-task"
FORMAT_VERSION = 1
PACKAGE_SUFFIX = ".safetensors"
TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POOLINGS = ("token",)
RESIZE_POLICIES = ("shorter_side_center_crop", "stretch")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PackageError(ValueError):
    """A task package that is malformed, corrupt, or does not fit the loaded backbone."""


def check_task_id(task_id: str) -> str:
    if not isinstance(task_id, str) or not TASK_ID_PATTERN.match(task_id):
        raise PackageError(
            f"task id {task_id!r} is not allowed: "
            "use 1-128 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
        )
    return task_id


@dataclass(frozen=True)
class Preprocess:
    """How the server turns an image into the task's input tensor."""

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "shorter_side_center_crop"
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        try:
            pre = cls(
                input_size=int(data["input_size"]),
                mean=tuple(float(x) for x in data["mean"]),
                std=tuple(float(x) for x in data["std"]),
                resize=str(data.get("resize", "shorter_side_center_crop")),
                crop_pct=float(data.get("crop_pct", 0.875)),
                interpolation=str(data.get("interpolation", "bicubic")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PackageError(f"field 'preprocess' is malformed: {error}") from error
        if len(pre.mean) != 3 or len(pre.std) != 3 or any(s <= 0 for s in pre.std):
            raise PackageError("field 'preprocess': mean and std need 3 values each, std > 0")
        if pre.resize not in RESIZE_POLICIES:
            raise PackageError(f"field 'preprocess.resize': {pre.resize!r} is not one of {RESIZE_POLICIES}")
        if pre.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise PackageError(f"field 'preprocess.interpolation': {pre.interpolation!r} is not supported")
        if not 0 < pre.crop_pct <= 1 or pre.input_size <= 0:
            raise PackageError("field 'preprocess': need input_size > 0 and 0 < crop_pct <= 1")
        return pre


@dataclass
class TaskPackage:
    """A pruned task, ready to load: kept prompts, pruned-token count, KV prompts, head, metadata.

    ``prompts [L, kept, D]`` holds the kept tokens of every layer with pruned segments already
    zeroed; ``num_pruned`` tokens were removed and are represented by their count alone.
    """

    task_id: str
    prompts: torch.Tensor
    num_pruned: int
    kv_key: torch.Tensor
    kv_value: torch.Tensor | None
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    backbone_spec: BackboneSpec
    backbone_fingerprint: str
    labels: list[str] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    pooling: str = "token"
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_prompts(
        cls,
        task_id: str,
        prompts: TaskPrompts,
        backbone: Backbone,
        labels: list[str] | None = None,
        preprocess: Preprocess | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> TaskPackage:
        """Apply pruning the way the paper's code does: mask, then drop pruned tokens, keep their count."""
        kept = prompts.kept_tokens()
        package = cls(
            task_id=check_task_id(task_id),
            prompts=prompts.masked_prompts()[:, kept].float().contiguous(),
            num_pruned=prompts.prompts.shape[1] - kept.numel(),
            kv_key=prompts.kv_key.float().contiguous(),
            kv_value=None if prompts.kv_value is None else prompts.kv_value.float().contiguous(),
            head_weight=prompts.head_weight.float().contiguous(),
            head_bias=prompts.head_bias.float().contiguous(),
            backbone_spec=backbone.spec,
            backbone_fingerprint=backbone.fingerprint,
            labels=labels,
            preprocess=preprocess or Preprocess(input_size=backbone.spec.img_size),
            provenance=dict(provenance or {}),
        )
        package.validate()
        return package

    @property
    def num_classes(self) -> int:
        return self.head_weight.shape[0]

    @property
    def num_kept(self) -> int:
        return self.prompts.shape[1]

    @property
    def num_kv(self) -> int:
        return self.kv_key.shape[2]

    @property
    def kv_shared(self) -> bool:
        return self.kv_value is None

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "prompts": self.prompts,
            "kv_key": self.kv_key,
            "head.weight": self.head_weight,
            "head.bias": self.head_bias,
        }
        if self.kv_value is not None:
            tensors["kv_value"] = self.kv_value
        return tensors

    @property
    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def metadata(self) -> dict[str, Any]:
        spec = self.backbone_spec
        backbone_params = _vit_parameter_count(spec)
        return {
            "task_id": self.task_id,
            "num_prompt_tokens": self.num_kept + self.num_pruned,
            "num_pruned_tokens": self.num_pruned,
            "kv_shared": self.kv_shared,
            "pooling": self.pooling,
            "labels": self.labels,
            "preprocess": self.preprocess.to_dict(),
            "backbone": {"spec": spec.to_dict(), "fingerprint": self.backbone_fingerprint},
            "parameters": {
                "task": self.num_parameters,
                "backbone": backbone_params,
                "share_of_backbone": self.num_parameters / backbone_params,
            },
            "provenance": self.provenance,
        }

    def validate(self) -> None:
        """Self-consistency: shapes agree with each other and the recorded backbone, values finite."""
        check_task_id(self.task_id)
        spec = self.backbone_spec
        depth, dim, heads = spec.depth, spec.embed_dim, spec.num_heads
        expect = {
            "prompts": (depth, None, dim),
            "kv_key": (depth, heads, None, dim // heads),
            "head.weight": (None, dim),
            "head.bias": (self.head_weight.shape[0],),
        }
        if self.kv_value is not None:
            expect["kv_value"] = tuple(self.kv_key.shape)
        for name, tensor in self.tensors().items():
            if tensor.dtype not in FLOAT_DTYPES:
                raise PackageError(f"tensor {name!r}: dtype {tensor.dtype} is not a float type")
            want = expect[name]
            if tensor.dim() != len(want) or any(
                w is not None and w != s for w, s in zip(want, tensor.shape, strict=True)
            ):
                shown = tuple("*" if w is None else w for w in want)
                raise PackageError(f"tensor {name!r}: shape {tuple(tensor.shape)} does not fit {shown}")
            if not torch.isfinite(tensor).all():
                raise PackageError(f"tensor {name!r}: contains NaN or Inf")
        if self.num_classes == 0:
            raise PackageError("tensor 'head.weight': the head has no classes")
        if self.num_pruned < 0:
            raise PackageError(f"field 'num_pruned_tokens': {self.num_pruned} is negative")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise PackageError(
                f"field 'labels': {len(self.labels)} labels for a head of {self.num_classes} classes"
            )
        if self.pooling not in POOLINGS:
            raise PackageError(f"field 'pooling': {self.pooling!r} is not supported (supported: {POOLINGS})")

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse a backbone other than the one the task was tuned on."""
        if self.backbone_spec != backbone.spec:
            raise PackageError(
                f"task {self.task_id!r}: field 'backbone.spec' {self.backbone_spec.to_dict()} "
                f"does not match the loaded backbone {backbone.spec.to_dict()}"
            )
        if self.backbone_fingerprint != backbone.fingerprint:
            raise PackageError(
                f"task {self.task_id!r}: field 'backbone.fingerprint' {self.backbone_fingerprint[:16]}... "
                f"does not match the loaded backbone's {backbone.fingerprint[:16]}..."
            )

    def to_bytes(self) -> bytes:
        self.validate()
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "task": json.dumps(self.metadata()),
        }
        return save({k: v.contiguous() for k, v in self.tensors().items()}, metadata=header)

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temp file in the same folder, fsynced, then renamed over ``path``."""
        return atomic_write(Path(path), self.to_bytes)


def load_package(path: str | Path, backbone: Backbone | None = None) -> TaskPackage:
    """Read and validate a package; with ``backbone``, also check it was made for that backbone."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except FileNotFoundError as error:
        raise PackageError(f"task package {path}: no such file") from error
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise PackageError(f"task package {path}: truncated or corrupt safetensors file ({error})") from error
    try:
        package = _from_parts(header, tensors)
    except PackageError as error:
        raise PackageError(f"task package {path}: {error}") from error
    if backbone is not None:
        package.check_backbone(backbone)
    return package


def _from_parts(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> TaskPackage:
    if header.get("format") != FORMAT_NAME:
        raise PackageError(f"field 'format' is {header.get('format')!r}, expected {FORMAT_NAME!r}")
    version = header.get("format_version")
    if version != str(FORMAT_VERSION):
        raise PackageError(
            f"field 'format_version' {version!r} is not supported (this runtime reads {FORMAT_VERSION})"
        )
    try:
        meta = json.loads(header["task"])
        spec = BackboneSpec.from_dict(meta["backbone"]["spec"])
        fingerprint = str(meta["backbone"]["fingerprint"])
        task_id, num_pruned = meta["task_id"], int(meta["num_pruned_tokens"])
        kv_shared = bool(meta["kv_shared"])
    except (KeyError, TypeError, ValueError) as error:
        raise PackageError(f"metadata 'task' is missing or malformed: {error!r}") from error
    required = {"prompts", "kv_key", "head.weight", "head.bias"} | (set() if kv_shared else {"kv_value"})
    missing = required - set(tensors)
    if missing:
        raise PackageError(f"tensors missing: {sorted(missing)}")
    extra = set(tensors) - required
    if extra:
        raise PackageError(f"unexpected tensors: {sorted(extra)}")
    labels = meta.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise PackageError("field 'labels' must be a list of strings")
    package = TaskPackage(
        task_id=task_id,
        prompts=tensors["prompts"],
        num_pruned=num_pruned,
        kv_key=tensors["kv_key"],
        kv_value=None if kv_shared else tensors["kv_value"],
        head_weight=tensors["head.weight"],
        head_bias=tensors["head.bias"],
        backbone_spec=spec,
        backbone_fingerprint=fingerprint,
        labels=labels,
        preprocess=Preprocess.from_dict(meta.get("preprocess") or {}),
        pooling=str(meta.get("pooling", "token")),
        provenance=dict(meta.get("provenance") or {}),
    )
    package.validate()
    return package


def _vit_parameter_count(spec: BackboneSpec) -> int:
    """Parameters of the ViT described by ``spec`` (no classifier), without building it."""
    d, hidden = spec.embed_dim, int(spec.embed_dim * spec.mlp_ratio)
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    embed = 3 * spec.patch_size**2 * d + d + d + (spec.num_patches + 1) * d
    return embed + spec.depth * per_block + 2 * d

"""Task package v1: one safetensors file per task (tensors + JSON metadata). Spec: docs/task-package.md."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from runtime.core.backbone import Backbone, BackboneError, BackboneSpec, sha256_of_tensors
from runtime.core.files import (
    SafetensorsContent,
    SafetensorsFormatError,
    atomic_write,
    parse_safetensors,
    read_safetensors,
    shown,
)
from runtime.core.prompts import TaskPrompts

log = logging.getLogger("e2vpt.package")

FORMAT_NAME = "e2vpt-task"
FORMAT_VERSION = 1
PACKAGE_SUFFIX = ".safetensors"
TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POOLINGS = ("token",)
RESIZE_POLICIES = ("shorter_side_center_crop", "stretch")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Header key of the content checksum: "sha256:<hex>" over the ``task`` JSON and the tensors.
CHECKSUM_KEY = "checksum"
CHECKSUM_PREFIX = "sha256:"
# A package holds prompts and a head: a few MB even for ViT-H with 21k classes. Larger is refused unread.
MAX_PACKAGE_BYTES = 2**30
# Bounds on values read from a package, far above real ones: they keep arithmetic and allocations sane.
MAX_COUNT = 2**31 - 1
MAX_INPUT_SIZE = 4096
MIN_CROP_PCT = 0.25


class PackageError(ValueError):
    """A task package that is malformed, corrupt, or does not fit the loaded backbone."""


def check_task_id(task_id: str) -> str:
    """``task_id`` if it is allowed; the error shows at most 64 characters of it (names come from clients)."""
    if not isinstance(task_id, str) or not TASK_ID_PATTERN.fullmatch(task_id):
        name = shown(task_id) if isinstance(task_id, str) else f"of type {type(task_id).__name__}"
        raise PackageError(
            f"task id {name} is not allowed: use 1-128 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
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
        """Read a ``preprocess`` object, checking every field's type and range (it comes from a file)."""
        if not isinstance(data, dict):
            raise PackageError(f"field 'preprocess' must be an object, got {type(data).__name__}")
        input_size = _integer(data, "input_size", "preprocess.input_size", 1, MAX_INPUT_SIZE)
        mean, std = (_triple(data, key) for key in ("mean", "std"))
        if any(s <= 0 for s in std):
            raise PackageError("field 'preprocess.std': every value must be > 0")
        resize = _choice(data, "resize", "shorter_side_center_crop", RESIZE_POLICIES)
        interpolation = _choice(data, "interpolation", "bicubic", INTERPOLATIONS)
        crop_pct = data.get("crop_pct", 0.875)
        if not _is_number(crop_pct) or not MIN_CROP_PCT <= crop_pct <= 1:
            raise PackageError(f"field 'preprocess.crop_pct' must be a number in [{MIN_CROP_PCT}, 1]")
        return cls(input_size, mean, std, resize, float(crop_pct), interpolation)


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
        # Each shape is checked against ones already checked ("*" in messages: any size).
        _check_tensor("prompts", self.prompts, (depth, None, dim))
        _check_tensor("kv_key", self.kv_key, (depth, heads, None, dim // heads))
        if self.kv_value is not None:
            _check_tensor("kv_value", self.kv_value, tuple(self.kv_key.shape))
        _check_tensor("head.weight", self.head_weight, (None, dim))
        _check_tensor("head.bias", self.head_bias, (self.head_weight.shape[0],))
        if self.num_classes == 0:
            raise PackageError("tensor 'head.weight': the head has no classes")
        if type(self.num_pruned) is not int or not 0 <= self.num_pruned <= MAX_COUNT:
            raise PackageError(
                f"field 'num_pruned_tokens': {self.num_pruned} is not an integer in 0..{MAX_COUNT}"
            )
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise PackageError(
                f"field 'labels': {len(self.labels)} labels for a head of {self.num_classes} classes"
            )
        if self.pooling not in POOLINGS:
            raise PackageError(
                f"field 'pooling': {shown(str(self.pooling))} is not supported (supported: {POOLINGS})"
            )

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse a backbone other than the one the task was tuned on."""
        if self.backbone_spec != backbone.spec:
            raise PackageError(
                f"task {self.task_id!r}: field 'backbone.spec' {self.backbone_spec.to_dict()} "
                f"does not match the loaded backbone {backbone.spec.to_dict()}"
            )
        if self.backbone_fingerprint != backbone.fingerprint:
            raise PackageError(
                f"task {self.task_id!r}: field 'backbone.fingerprint' {shown(self.backbone_fingerprint, 16)} "
                f"does not match the loaded backbone's {backbone.fingerprint[:16]}..."
            )

    def to_bytes(self) -> bytes:
        self.validate()
        tensors = {k: v.contiguous() for k, v in self.tensors().items()}
        task = json.dumps(self.metadata())
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "task": task,
            CHECKSUM_KEY: content_checksum(task, tensors),
        }
        return save(tensors, metadata=header)

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temp file in the same folder, fsynced, then renamed over ``path``."""
        return atomic_write(Path(path), self.to_bytes)


def content_checksum(task: str, tensors: dict[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` over the header's ``task`` JSON (UTF-8), a newline, then the tensors as the
    backbone fingerprint hashes them (sorted names, dtype, shape, raw bytes)."""
    return CHECKSUM_PREFIX + sha256_of_tensors(tensors, task.encode("utf-8", "surrogatepass") + b"\n")


def load_package(path: str | Path, backbone: Backbone | None = None, name: str | None = None) -> TaskPackage:
    """Read and validate a package; with ``backbone``, also check it was made for that backbone.

    Any problem with the file raises ``PackageError``, whose message names the file as ``name``
    (default: ``path`` as given; a server passes the bare file name so clients never see its paths).
    The file is read whole into memory and closed: the package owns its tensors, so the file may be
    replaced, rewritten or truncated afterwards without any effect on it.
    """
    path = Path(path)
    name = str(path) if name is None else name
    try:
        content = read_safetensors(path, MAX_PACKAGE_BYTES)
    except FileNotFoundError as error:
        raise PackageError(f"task package {name}: no such file") from error
    except OSError as error:
        raise PackageError(f"task package {name}: cannot be read ({error.strerror})") from error
    except SafetensorsFormatError as error:
        raise PackageError(f"task package {name}: truncated or corrupt safetensors file ({error})") from error
    return _package_of(content, backbone, name)


def package_from_bytes(data: bytes | bytearray, backbone: Backbone | None, name: str) -> TaskPackage:
    """``load_package`` of a package's bytes fetched from elsewhere (an object store's body)."""
    if len(data) > MAX_PACKAGE_BYTES:
        raise PackageError(
            f"task package {name}: {len(data):,} bytes exceed the limit of {MAX_PACKAGE_BYTES:,}"
        )
    try:
        content = parse_safetensors(bytearray(data))
    except SafetensorsFormatError as error:
        raise PackageError(f"task package {name}: truncated or corrupt safetensors file ({error})") from error
    return _package_of(content, backbone, name)


def _package_of(content: SafetensorsContent, backbone: Backbone | None, name: str) -> TaskPackage:
    # One allocation per tensor: a loaded task then keeps only the tensors it uses, not the whole file.
    tensors = {key: tensor.clone() for key, tensor in content.tensors.items()}
    try:
        package = _from_parts(content.metadata, tensors, name)
    except PackageError as error:
        raise PackageError(f"task package {name}: {error}") from error
    if backbone is not None:
        package.check_backbone(backbone)
    return package


def _from_parts(header: dict[str, str], tensors: dict[str, torch.Tensor], name: str) -> TaskPackage:
    if header.get("format") != FORMAT_NAME:
        found = header.get("format")
        raise PackageError(
            f"field 'format' is {None if found is None else shown(found)}, expected {FORMAT_NAME!r}"
        )
    version = header.get("format_version")
    if version != str(FORMAT_VERSION):
        raise PackageError(
            f"field 'format_version' {None if version is None else shown(version)} is not supported "
            f"(this runtime reads {FORMAT_VERSION})"
        )
    task = header.get("task")
    if task is None:
        raise PackageError("metadata 'task' is missing or malformed: absent")
    _verify_checksum(header.get(CHECKSUM_KEY), task, tensors, name)
    try:
        meta = json.loads(task)
    except (ValueError, RecursionError) as error:
        raise PackageError(f"metadata 'task' is missing or malformed: {type(error).__name__}") from error
    if not isinstance(meta, dict):
        raise PackageError(f"metadata 'task' must be a JSON object, got {type(meta).__name__}")
    backbone = _typed(meta, "backbone", dict, "backbone")
    try:
        spec = BackboneSpec.from_dict(_typed(backbone, "spec", dict, "backbone.spec"))
    except (BackboneError, TypeError) as error:
        raise PackageError(f"field 'backbone.spec': {error}") from error
    fingerprint = _typed(backbone, "fingerprint", str, "backbone.fingerprint")
    task_id = check_task_id(_typed(meta, "task_id", str, "task_id"))
    num_pruned = _integer(meta, "num_pruned_tokens", "num_pruned_tokens", 0, MAX_COUNT)
    kv_shared = _typed(meta, "kv_shared", bool, "kv_shared")
    required = {"prompts", "kv_key", "head.weight", "head.bias"} | (set() if kv_shared else {"kv_value"})
    missing = required - set(tensors)
    if missing:
        raise PackageError(f"tensors missing: {sorted(missing)}")
    extra = sorted(set(tensors) - required)
    if extra:
        raise PackageError(f"unexpected tensors: {', '.join(shown(t) for t in extra[:5])}")
    labels = meta.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise PackageError("field 'labels' must be a list of strings")
    pooling = meta.get("pooling", "token")
    if not isinstance(pooling, str):
        raise PackageError("field 'pooling' must be a string")
    provenance = meta.get("provenance")
    if provenance is not None and not isinstance(provenance, dict):
        raise PackageError(f"field 'provenance' must be an object, got {type(provenance).__name__}")
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
        preprocess=Preprocess.from_dict(_typed(meta, "preprocess", dict, "preprocess")),
        pooling=pooling,
        provenance=provenance or {},
    )
    package.validate()
    return package


def _verify_checksum(recorded: str | None, task: str, tensors: dict[str, torch.Tensor], name: str) -> None:
    if recorded is None:
        # Packages written before checksums existed are still v1 packages: load them, but say so.
        log.warning("task package has no content checksum; loaded unverified", extra={"package": name})
        return
    actual = content_checksum(task, tensors)
    if recorded != actual:
        raise PackageError(
            f"checksum mismatch: the header records {shown(recorded, 23)}, the content hashes to "
            f"{shown(actual, 23)}: the file is corrupt or was edited after it was written"
        )


def _typed(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise PackageError(f"metadata 'task' is missing or malformed: field {where!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PackageError(f"field {where!r} must be {_json_type(kind)}, got {_json_type(type(value))}")
    return value


def _json_type(kind: type) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
    return names.get(kind, "a number" if kind is float else "null")


def _integer(data: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = _typed(data, key, int, where)
    if not low <= value <= high:
        raise PackageError(f"field {where!r}: {value} is not in {low}..{high}")
    return int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _triple(data: dict[str, Any], key: str) -> tuple[float, float, float]:
    values = _typed(data, key, list, f"preprocess.{key}")
    if len(values) != 3 or not all(_is_number(v) for v in values):
        raise PackageError(f"field 'preprocess.{key}' must hold 3 finite numbers")
    return (float(values[0]), float(values[1]), float(values[2]))


def _choice(data: dict[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = data.get(key, default)
    if value not in allowed:
        raise PackageError(f"field 'preprocess.{key}': {shown(str(value))} is not one of {allowed}")
    return str(value)


def _check_tensor(name: str, tensor: torch.Tensor, want: tuple[int | None, ...]) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise PackageError(f"tensor {name!r}: dtype {tensor.dtype} is not a float type")
    if tensor.dim() != len(want) or any(
        w is not None and w != s for w, s in zip(want, tensor.shape, strict=False)
    ):
        wanted = tuple("*" if w is None else w for w in want)
        raise PackageError(f"tensor {name!r}: shape {tuple(tensor.shape)} does not fit {wanted}")
    if not torch.isfinite(tensor).all():
        raise PackageError(f"tensor {name!r}: contains NaN or Inf")


def _vit_parameter_count(spec: BackboneSpec) -> int:
    """Parameters of the ViT described by ``spec`` (no classifier), without building it."""
    d, hidden = spec.embed_dim, int(spec.embed_dim * spec.mlp_ratio)
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    embed = 3 * spec.patch_size**2 * d + d + d + (spec.num_patches + 1) * d
    return embed + spec.depth * per_block + 2 * d

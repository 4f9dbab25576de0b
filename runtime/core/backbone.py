"""The frozen backbone: a timm VisionTransformer, its architecture record and fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from runtime.core.files import (
    SafetensorsFormatError,
    atomic_write,
    read_safetensors,
    read_safetensors_metadata,
    shown,
)

RANDOM_WEIGHTS = "random"
# Header key of a backbone file this project wrote: ``{"spec": ..., "fingerprint": ..., "source": ...}``.
BACKBONE_METADATA = "e2vpt_backbone"

# Named architectures (patch 16, 224 px, CLS pooling); any other shape goes through ``BackboneSpec``.
ARCHITECTURES: dict[str, dict[str, int]] = {
    "vit_tiny_patch16_224": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small_patch16_224": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base_patch16_224": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large_patch16_224": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "vit_huge_patch16_224": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}


# Bounds on a spec read from a file; far above any ViT, low enough for plain integer arithmetic.
SPEC_LIMITS = {"embed_dim": 2**16, "depth": 2**10, "num_heads": 2**10, "patch_size": 2**12, "img_size": 2**14}
MAX_MLP_RATIO = 64
MAX_NAME_LENGTH = 256


class BackboneError(ValueError):
    """A backbone that cannot be built or loaded as asked."""


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture of a ViT backbone: everything needed to rebuild it without weights."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0
    name: str = "vit_base_patch16_224"

    def __post_init__(self) -> None:
        # Specs are read from files: refuse what would break arithmetic later (bools, floats, huge).
        for field_name, limit in SPEC_LIMITS.items():
            value = getattr(self, field_name)
            if type(value) is not int or not 1 <= value <= limit:
                raise BackboneError(f"backbone spec field {field_name!r} must be an integer in 1..{limit}")
        ratio = self.mlp_ratio
        if type(ratio) not in (int, float) or not 0 < ratio <= MAX_MLP_RATIO:
            raise BackboneError(f"backbone spec field 'mlp_ratio' must be a number in (0, {MAX_MLP_RATIO}]")
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME_LENGTH:
            raise BackboneError(f"backbone spec field 'name' must be a string of at most {MAX_NAME_LENGTH}")

    @classmethod
    def named(cls, name: str) -> BackboneSpec:
        if name not in ARCHITECTURES:
            raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
        return cls(name=name, **ARCHITECTURES[name])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        if not isinstance(data, dict):
            raise BackboneError(f"backbone spec must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            listed = ", ".join(shown(name) for name in unknown[:5])
            raise BackboneError(f"unknown backbone spec fields: {listed}{' ...' if len(unknown) > 5 else ''}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def build(self) -> VisionTransformer:
        """An uninitialised-weights timm ViT of this shape, CLS pooling, no classifier, LN eps 1e-6."""
        if self.embed_dim % self.num_heads:
            raise BackboneError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        return VisionTransformer(
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            num_classes=0,
            global_pool="token",
            class_token=True,
        )


def fingerprint(state: Mapping[str, Tensor]) -> str:
    """SHA-256 over sorted tensor names, dtypes, shapes and bytes: equal weights, equal print."""
    return sha256_of_tensors(state)


def sha256_of_tensors(tensors: Mapping[str, Tensor], preamble: bytes = b"") -> str:
    """SHA-256 (hex) of ``preamble``, then per tensor by sorted name ``"<name>|<dtype>|<shape tuple>\\n"``
    and its raw little-endian bytes."""
    digest = hashlib.sha256(preamble)
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        line = f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}\n"
        digest.update(line.encode("utf-8", "surrogatepass"))  # names read from a file may hold anything
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a safetensors file or a weights-only torch state dict (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"backbone weights {path}: no such file")
    if path.suffix == ".safetensors":
        try:
            # Into process memory, not mapped: a backbone file replaced or truncated later cannot
            # change the served weights or fault the server.
            return read_safetensors(path).tensors
        except (SafetensorsFormatError, OSError) as error:
            raise BackboneError(
                f"backbone weights {path}: not a readable safetensors file ({error})"
            ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or corrupt files
        raise BackboneError(f"backbone weights {path}: not a weights-only torch file ({error})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneError(f"backbone weights {path}: expected a mapping of tensor names to tensors")
    return state


def recorded_spec(path: str | Path) -> BackboneSpec | None:
    """The architecture recorded in a file ``Backbone.save`` wrote; ``None`` for other files."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        raw = read_safetensors_metadata(path).get(BACKBONE_METADATA)
        return None if raw is None else BackboneSpec.from_dict(json.loads(raw)["spec"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise BackboneError(f"{path}: header {BACKBONE_METADATA!r} is unreadable: {error}") from error


class Backbone:
    """A frozen timm ViT in eval mode with the record that tasks are checked against."""

    def __init__(self, model: VisionTransformer, spec: BackboneSpec, source: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.source = source
        self.fingerprint = fingerprint(self.model.state_dict())

    @classmethod
    def create(
        cls,
        spec: BackboneSpec | str | None,
        weights: str | Path = RANDOM_WEIGHTS,
        seed: int = 0,
    ) -> Backbone:
        """Build ``spec`` and load ``weights`` (a file) or draw seeded random ones (``"random"``).

        ``spec=None`` takes the architecture recorded in the weights file's header.
        """
        if spec is None:
            if str(weights) == RANDOM_WEIGHTS:
                raise BackboneError("random weights need an architecture: name the backbone")
            spec = recorded_spec(weights)
            if spec is None:
                raise BackboneError(f"{weights}: no architecture recorded in the file; name the backbone")
        spec = BackboneSpec.named(spec) if isinstance(spec, str) else spec
        if str(weights) == RANDOM_WEIGHTS:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = spec.build()
            return cls(model, spec, source=f"random(seed={seed}) - NOT pretrained, for demos and tests")
        state = {k: v for k, v in read_weights(weights).items() if not k.startswith("head.")}
        return cls.from_state_dict(spec, state, source=str(weights))

    @classmethod
    def from_state_dict(cls, spec: BackboneSpec, state: dict[str, Tensor], source: str) -> Backbone:
        """A backbone of ``spec`` holding exactly ``state`` (timm names, no classifier), in fp32."""
        with torch.device("meta"):  # random init would be overwritten anyway, and is slow for large ViTs
            model = spec.build()
        try:
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        except RuntimeError as error:
            detail = " ".join(str(error).split())[:400]
            raise BackboneError(f"backbone weights {source} do not fit {spec.name}: {detail}") from error
        return cls(model, spec, source=source)

    def save(self, path: str | Path) -> Path:
        """Write the timm state dict as safetensors, atomically; the header records spec and fingerprint."""
        from safetensors.torch import save

        path = Path(path)
        if path.suffix != ".safetensors":
            raise BackboneError(
                f"{path}: the backbone is written as safetensors; name the file *.safetensors"
            )
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        header = {BACKBONE_METADATA: json.dumps(self.describe())}
        return atomic_write(path, lambda: save(state, metadata=header))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Backbone:
        """Move/cast in place; the fingerprint stays that of the loaded weights."""
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "fingerprint": self.fingerprint, "source": self.source}

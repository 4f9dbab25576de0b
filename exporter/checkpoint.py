"""Reading training checkpoints: the paper code's ``{"model": state_dict}`` and the native format.

Nothing here unpickles code: torch files are read with ``torch.load(..., weights_only=True)``.
Every error is an ``ExportError`` that names the file and, where there is one, the key.

Pruning masks given as JSON follow the paper code's pruning stage (``tune_vtab_PruningRewind_CVK.py``
writes them, ``src/models/vit_prompt/vit_prompt_VK.py`` reads them, ChengHan111/E2VPT):

- ``mask_tokens/{N}_soft_tokens_to_mask.json`` is ``{"N": [ids]}``: ``N`` is how many tokens are
  masked, the ids are the **pruned** tokens, 0-based. The reader takes the union of all lists and
  ignores the key, as ``load_soft_token_mask_file`` does.
- ``mask_tokens_pieces/{M}_soft_tokens_pieces_to_mask.json`` is ``{"token id": [segment ids]}``:
  the **pruned** segments of each token, 0-based, as ``load_soft_tokens_pieces_mask_file`` reads it.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from runtime.core.backbone import ARCHITECTURES, BackboneError, BackboneSpec
from runtime.core.files import atomic_write
from runtime.core.package import Preprocess
from runtime.core.prompts import DEFAULT_SEGMENTS, TaskPrompts
from runtime.paper import layout as keys

NATIVE_METADATA = "e2vpt_native"
NATIVE_VERSION = 1
NATIVE_REQUIRED = ("prompts", "head.weight", "head.bias")
NATIVE_OPTIONAL = ("kv_key", "kv_value", "token_mask", "segment_mask")
PROMPT_PROJECTION = keys.PREFIX + "prompt_proj.weight"


class ExportError(ValueError):
    """A checkpoint, mask file or backbone that cannot be exported as asked; names file and key."""


@dataclass
class LoadedTask:
    """A task read from a checkpoint: its parameters plus what is needed to rebuild and check it.

    ``paper_state`` is the checkpoint's state dict with the pruning masks in force (paper
    checkpoints only; it holds the backbone). ``spec`` is the backbone architecture when the
    checkpoint determines it; ``backbone_fingerprint`` the fingerprint a native checkpoint records.
    """

    path: Path
    kind: str
    prompts: TaskPrompts
    paper_state: dict[str, Tensor] | None = None
    spec: BackboneSpec | None = None
    backbone_fingerprint: str | None = None
    labels: list[str] | None = None
    preprocess: Preprocess | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(
    path: str | Path,
    token_mask: str | Path | None = None,
    segment_mask: str | Path | None = None,
    segments: int = DEFAULT_SEGMENTS,
    num_heads: int | None = None,
    arch: str | None = None,
) -> LoadedTask:
    """Read a paper-code or native checkpoint, with pruning masks from JSON files when given."""
    path = Path(path)
    container = _load_container(path)
    if NATIVE_METADATA in container.metadata or "prompts" in container.tensors:
        task = _read_native(path, container)
    else:
        task = _read_paper(path, container.tensors, num_heads, arch)
    if token_mask is not None or segment_mask is not None:
        _apply_json_masks(task, token_mask, segment_mask, segments)
    return task


@dataclass
class _Container:
    tensors: dict[str, Tensor]
    metadata: dict[str, str]


def _load_container(path: Path) -> _Container:
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    with path.open("rb") as handle:
        head = handle.read(9)
    # A safetensors file opens with an 8-byte header length and then the JSON header's "{".
    if head[8:9] == b"{":
        return _load_safetensors(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign, corrupt or code-carrying files
        raise ExportError(
            f"{path}: not a checkpoint (neither safetensors nor a weights-only torch file; "
            f"pickled code is never executed): {str(error).splitlines()[0]}"
        ) from error
    if not isinstance(loaded, dict):
        raise ExportError(f"{path}: not a checkpoint: holds a {type(loaded).__name__}, expected a dict")
    if isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    metadata = loaded.get("metadata") if isinstance(loaded.get("metadata"), str) else None
    tensors = {k: v for k, v in loaded.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ExportError(f"{path}: not a checkpoint: no tensors (expected {{'model': state_dict}})")
    return _Container(_strip_module_prefix(tensors), {} if metadata is None else {NATIVE_METADATA: metadata})


def _load_safetensors(path: Path) -> _Container:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ExportError(f"{path}: not a checkpoint (truncated or corrupt safetensors: {error})") from error
    return _Container(_strip_module_prefix(tensors), metadata)


def _strip_module_prefix(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoints saved from ``DataParallel`` prefix every key with ``module.``."""
    if tensors and all(k.startswith("module.") for k in tensors):
        return {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


# --- the paper code's checkpoint -------------------------------------------------------------


def _read_paper(path: Path, state: dict[str, Tensor], num_heads: int | None, arch: str | None) -> LoadedTask:
    if keys.PROMPTS not in state:
        raise ExportError(
            f"{path}: no prompts (key {keys.PROMPTS!r} is missing): this looks like a fully "
            "fine-tuned or plain model, not an E2VPT checkpoint"
        )
    if PROMPT_PROJECTION in state:
        raise ExportError(f"{path}: key {PROMPT_PROJECTION!r}: projected prompts are not supported")
    if keys.DEEP_PROMPTS not in state:
        raise ExportError(
            f"{path}: key {keys.DEEP_PROMPTS!r} is missing: shallow-only prompts are not supported "
            "(the runtime serves deep prompts)"
        )
    for name in (keys.HEAD_WEIGHT, keys.HEAD_BIAS):
        if name not in state:
            raise ExportError(f"{path}: missing head: key {name!r} is not in the checkpoint")

    shallow, deep = state[keys.PROMPTS], state[keys.DEEP_PROMPTS]
    _expect(path, keys.PROMPTS, shallow, (1, None, None))
    num_prompts, dim = shallow.shape[1], shallow.shape[2]
    depth = _layer_count(path, state)
    _expect(path, keys.DEEP_PROMPTS, deep, (depth - 1, num_prompts, dim))
    _expect(path, keys.HEAD_WEIGHT, state[keys.HEAD_WEIGHT], (None, dim))
    _expect(path, keys.HEAD_BIAS, state[keys.HEAD_BIAS], (state[keys.HEAD_WEIGHT].shape[0],))
    kv = _paper_kv_prompts(path, state, depth, dim)
    token_mask, segment_mask = state.get(keys.TOKEN_MASK), state.get(keys.SEGMENT_MASK)
    _check_masks(path, keys.TOKEN_MASK, keys.SEGMENT_MASK, token_mask, segment_mask, num_prompts, dim)

    spec = infer_spec(path, state, None if kv is None else kv[0].shape[1], num_heads, arch)
    # Without KV prompts the package still carries an empty [L, H, 0, D/H] tensor.
    empty_kv = shallow.new_zeros(depth, spec.num_heads, 0, spec.head_dim)
    kv_key, kv_value = kv if kv is not None else (empty_kv, None)
    prompts = TaskPrompts(
        prompts=torch.cat([shallow, deep], dim=0),
        kv_key=kv_key,
        kv_value=kv_value,
        head_weight=state[keys.HEAD_WEIGHT],
        head_bias=state[keys.HEAD_BIAS],
        token_mask=token_mask,
        segment_mask=segment_mask,
    )
    return LoadedTask(path=path, kind="paper", prompts=prompts, paper_state=dict(state), spec=spec)


def _layer_count(path: Path, state: dict[str, Tensor]) -> int:
    layer_prefix = keys.PREFIX + "encoder.layer."
    indices = {int(k[len(layer_prefix) :].split(".")[0]) for k in state if k.startswith(layer_prefix)}
    if not indices:
        raise ExportError(f"{path}: no transformer layers (no key starts with {layer_prefix!r})")
    return max(indices) + 1


def _paper_kv_prompts(
    path: Path, state: dict[str, Tensor], depth: int, dim: int
) -> tuple[Tensor, Tensor | None] | None:
    """Per-layer KV prompts stacked to ``[L, H, T, D/H]``, values ``None`` when shared; ``None`` if absent."""
    shared = [keys.KV_SHARED.format(i=i) in state for i in range(depth)]
    separate = [keys.KV_KEY.format(i=i) in state for i in range(depth)]
    if not any(shared) and not any(separate):
        return None
    template = keys.KV_SHARED if any(shared) else keys.KV_KEY
    names = [template.format(i=i) for i in range(depth)]
    for name in names:
        if name not in state:
            raise ExportError(f"{path}: key {name!r} is missing (other layers have KV prompts)")
    first = state[names[0]]
    _expect(path, names[0], first, (None, None, None))
    heads, head_dim = first.shape[0], first.shape[2]
    if heads * head_dim != dim:
        raise ExportError(
            f"{path}: key {names[0]!r}: shape {tuple(first.shape)} does not fit width {dim} "
            f"(heads x head dim must equal {dim})"
        )
    for name in names:
        _expect(path, name, state[name], tuple(first.shape))
    kv_key = torch.stack([state[n] for n in names])
    if template == keys.KV_SHARED:
        return kv_key, None
    value_names = [keys.KV_VALUE.format(i=i) for i in range(depth)]
    for name in value_names:
        if name not in state:
            raise ExportError(f"{path}: key {name!r} is missing (separate key prompts need value prompts)")
        _expect(path, name, state[name], tuple(first.shape))
    return kv_key, torch.stack([state[n] for n in value_names])


def infer_spec(
    path: Path,
    state: dict[str, Tensor],
    kv_heads: int | None,
    num_heads: int | None = None,
    arch: str | None = None,
) -> BackboneSpec:
    """The backbone architecture read from tensor shapes; heads from the KV prompts or the options."""
    t = keys.PREFIX
    names = {
        "cls": t + "embeddings.cls_token",
        "pos": t + "embeddings.position_embeddings",
        "patch": t + "embeddings.patch_embeddings.weight",
        "fc1": keys.LAYER.format(i=0) + "ffn.fc1.weight",
    }
    for name in names.values():
        if name not in state:
            raise ExportError(f"{path}: backbone key {name!r} is missing")
    dim = state[names["cls"]].shape[-1]
    depth = _layer_count(path, state)
    patch_weight = state[names["patch"]]
    _expect(path, names["patch"], patch_weight, (dim, 3, None, None))
    patch = patch_weight.shape[-1]
    positions = state[names["pos"]].shape[1] - 1
    grid = math.isqrt(max(positions, 0))
    if grid * grid != positions or state[names["pos"]].shape[-1] != dim:
        raise ExportError(
            f"{path}: key {names['pos']!r}: shape {tuple(state[names['pos']].shape)} is not "
            f"[1, 1 + n*n, {dim}]"
        )
    mlp_ratio = state[names["fc1"]].shape[0] / dim
    named = {n: d for n, d in ARCHITECTURES.items() if d["embed_dim"] == dim and d["depth"] == depth}
    named = {n: d for n, d in named.items() if patch == 16 and grid * patch == 224 and mlp_ratio == 4.0}
    if arch is not None and arch not in named:
        raise ExportError(
            f"{path}: --arch {arch} does not match the checkpoint's backbone "
            f"(width {dim}, {depth} layers, patch {patch}, {grid * patch} px)"
        )
    heads = _resolve_heads(path, kv_heads, num_heads, ARCHITECTURES[arch]["num_heads"] if arch else None)
    if heads is None and len(named) == 1:
        heads = next(iter(named.values()))["num_heads"]
    if heads is None:
        raise ExportError(
            f"{path}: the head count cannot be read from the checkpoint (it has no KV prompts and its "
            f"width {dim} / depth {depth} match no named architecture): pass --num-heads"
        )
    known_name = arch or next((n for n, d in named.items() if d["num_heads"] == heads), None)
    if heads <= 0 or dim % heads:
        raise ExportError(f"{path}: width {dim} is not divisible by {heads} heads")
    spec_name = known_name or f"vit_custom_d{dim}_l{depth}_h{heads}_p{patch}_{grid * patch}"
    return BackboneSpec(dim, depth, heads, patch, grid * patch, mlp_ratio, spec_name)


def _resolve_heads(path: Path, *sources: int | None) -> int | None:
    given = [s for s in sources if s is not None]
    if len(set(given)) > 1:
        raise ExportError(
            f"{path}: head counts disagree (KV prompts, --num-heads, --arch give {sources}; None = not given)"
        )
    return given[0] if given else None


# --- the native checkpoint ---------------------------------------------------------------------


def _read_native(path: Path, container: _Container) -> LoadedTask:
    tensors = container.tensors
    meta = _native_metadata(path, container.metadata.get(NATIVE_METADATA))
    for name in NATIVE_REQUIRED:
        if name not in tensors:
            what = "missing head: " if name.startswith("head.") else ""
            raise ExportError(f"{path}: {what}key {name!r} is not in the native checkpoint")
    unknown = set(tensors) - set(NATIVE_REQUIRED) - set(NATIVE_OPTIONAL)
    if unknown:
        raise ExportError(f"{path}: unexpected keys {sorted(unknown)} in the native checkpoint")
    prompts = tensors["prompts"]
    _expect(path, "prompts", prompts, (None, None, None))
    depth, num_prompts, dim = prompts.shape
    _expect(path, "head.weight", tensors["head.weight"], (None, dim))
    _expect(path, "head.bias", tensors["head.bias"], (tensors["head.weight"].shape[0],))
    spec = None
    if "backbone" in meta and "spec" in meta["backbone"]:
        try:
            spec = BackboneSpec.from_dict(meta["backbone"]["spec"])
        except (BackboneError, TypeError) as error:
            raise ExportError(f"{path}: metadata 'backbone.spec' is malformed: {error}") from error
    kv_key = tensors.get("kv_key")
    if kv_key is None:
        if "kv_value" in tensors:
            raise ExportError(f"{path}: key 'kv_value' is given without 'kv_key'")
        heads = spec.num_heads if spec is not None else 1
        kv_key = prompts.new_zeros(depth, heads, 0, dim // heads)
    _expect(path, "kv_key", kv_key, (depth, None, None, None))
    if kv_key.shape[1] * kv_key.shape[3] != dim:
        raise ExportError(
            f"{path}: key 'kv_key': shape {tuple(kv_key.shape)} does not fit width {dim} "
            "(heads x head dim must equal the prompt width)"
        )
    kv_value = tensors.get("kv_value")
    if kv_value is not None:
        _expect(path, "kv_value", kv_value, tuple(kv_key.shape))
    token_mask, segment_mask = tensors.get("token_mask"), tensors.get("segment_mask")
    _check_masks(path, "token_mask", "segment_mask", token_mask, segment_mask, num_prompts, dim)
    labels = meta.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise ExportError(f"{path}: metadata 'labels' must be a list of strings")
    try:
        preprocess = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else None
    except ValueError as error:
        raise ExportError(f"{path}: metadata {error}") from error
    task_prompts = TaskPrompts(
        prompts=prompts,
        kv_key=kv_key,
        kv_value=kv_value,
        head_weight=tensors["head.weight"],
        head_bias=tensors["head.bias"],
        token_mask=token_mask,
        segment_mask=segment_mask,
    )
    fingerprint = meta.get("backbone", {}).get("fingerprint")
    return LoadedTask(
        path=path,
        kind="native",
        prompts=task_prompts,
        spec=spec,
        backbone_fingerprint=str(fingerprint) if fingerprint else None,
        labels=labels,
        preprocess=preprocess,
        provenance=dict(meta.get("provenance") or {}),
    )


def _native_metadata(path: Path, raw: str | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ExportError(f"{path}: metadata {NATIVE_METADATA!r} is not valid JSON: {error}") from error
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: metadata {NATIVE_METADATA!r} must be a JSON object")
    version = meta.get("format_version", NATIVE_VERSION)
    if version != NATIVE_VERSION:
        raise ExportError(
            f"{path}: metadata 'format_version' {version!r} is not supported (this exporter reads "
            f"{NATIVE_VERSION})"
        )
    if not isinstance(meta.get("backbone", {}), dict):
        raise ExportError(f"{path}: metadata 'backbone' must be an object")
    return meta


def write_native(path: str | Path, prompts: TaskPrompts, metadata: dict[str, Any] | None = None) -> Path:
    """Write a native checkpoint atomically: safetensors for ``*.safetensors``, else a torch file."""
    path = Path(path)
    tensors = {
        "prompts": prompts.prompts,
        "kv_key": prompts.kv_key,
        "head.weight": prompts.head_weight,
        "head.bias": prompts.head_bias,
    }
    optional = {
        "kv_value": prompts.kv_value,
        "token_mask": prompts.token_mask,
        "segment_mask": prompts.segment_mask,
    }
    tensors.update({k: v for k, v in optional.items() if v is not None})
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = json.dumps({"format_version": NATIVE_VERSION, **(metadata or {})})
    if path.suffix == ".safetensors":
        return atomic_write(path, lambda: save(tensors, metadata={NATIVE_METADATA: meta}))

    def torch_bytes() -> bytes:
        buffer = io.BytesIO()
        torch.save({**tensors, "metadata": meta}, buffer)
        return buffer.getvalue()

    return atomic_write(path, torch_bytes)


# --- masks ---------------------------------------------------------------------------------------


def _check_masks(
    path: Path,
    token_key: str,
    segment_key: str,
    token_mask: Tensor | None,
    segment_mask: Tensor | None,
    num_prompts: int,
    dim: int,
) -> None:
    if token_mask is not None and tuple(token_mask.shape) != (num_prompts,):
        raise ExportError(
            f"{path}: key {token_key!r}: token mask shape {tuple(token_mask.shape)} does not fit "
            f"the {num_prompts} prompt tokens"
        )
    if segment_mask is not None:
        if segment_mask.dim() != 2 or segment_mask.shape[0] != num_prompts:
            raise ExportError(
                f"{path}: key {segment_key!r}: segment mask shape {tuple(segment_mask.shape)} does not "
                f"fit the {num_prompts} prompt tokens ([Np, S] expected)"
            )
        if segment_mask.shape[1] == 0 or dim % segment_mask.shape[1]:
            raise ExportError(
                f"{path}: key {segment_key!r}: {segment_mask.shape[1]} segments do not divide width {dim}"
            )


def _apply_json_masks(
    task: LoadedTask, token_file: str | Path | None, segment_file: str | Path | None, segments: int
) -> None:
    """Replace the checkpoint's masks by the JSON ones; an in-checkpoint mask must agree or be all ones."""
    prompts = task.prompts
    num_prompts, dim = prompts.prompts.shape[1], prompts.prompts.shape[2]
    if token_file is not None:
        mask = read_token_mask(token_file, num_prompts)
        prompts.token_mask = _merge_mask(task.path, token_file, prompts.token_mask, mask, keys.TOKEN_MASK)
        task.provenance["token_mask_file"] = Path(token_file).name
    if segment_file is not None:
        if prompts.segment_mask is not None:
            segments = prompts.segment_mask.shape[1]
        if dim % segments:
            raise ExportError(f"{segment_file}: {segments} segments do not divide the prompt width {dim}")
        mask = read_segment_mask(segment_file, num_prompts, segments)
        prompts.segment_mask = _merge_mask(
            task.path, segment_file, prompts.segment_mask, mask, keys.SEGMENT_MASK
        )
        task.provenance["segment_mask_file"] = Path(segment_file).name
    if task.paper_state is not None:
        for name, kept in ((keys.TOKEN_MASK, prompts.token_mask), (keys.SEGMENT_MASK, prompts.segment_mask)):
            if kept is not None:
                task.paper_state[name] = kept


def _merge_mask(
    path: Path, json_file: str | Path, current: Tensor | None, from_json: Tensor, key: str
) -> Tensor:
    if current is None or bool((current == 1).all()) or torch.equal(current.to(from_json.dtype), from_json):
        return from_json
    raise ExportError(
        f"{json_file}: the mask disagrees with key {key!r} of {path} "
        f"({int((current.to(from_json.dtype) != from_json).sum())} entries differ)"
    )


def _read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ExportError(f"{path}: no such mask file") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: not a JSON mask file: {error}") from error
    if not isinstance(data, dict):
        raise ExportError(f"{path}: a mask file must hold a JSON object, found {type(data).__name__}")
    return data


def _ids(path: str | Path, key: str, value: Any, limit: int, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ExportError(f"{path}: key {key!r}: expected a list of integer {what} ids")
    bad = [x for x in value if not 0 <= x < limit]
    if bad:
        raise ExportError(
            f"{path}: key {key!r}: {what} ids {bad[:5]} do not fit the {limit} {what}s (ids are 0-based)"
        )
    return value


def read_token_mask(path: str | Path, num_prompts: int) -> Tensor:
    """``{"N": [pruned token ids]}`` -> ``[Np]`` mask (1 kept, 0 pruned); all lists are unioned."""
    mask = torch.ones(num_prompts)
    for key, value in _read_json(path).items():
        mask[_ids(path, key, value, num_prompts, "token")] = 0
    return mask


def read_segment_mask(path: str | Path, num_prompts: int, segments: int) -> Tensor:
    """``{"token id": [pruned segment ids]}`` -> ``[Np, S]`` mask (1 kept, 0 pruned)."""
    mask = torch.ones(num_prompts, segments)
    for key, value in _read_json(path).items():
        try:
            token = int(key)
        except ValueError as error:
            raise ExportError(f"{path}: key {key!r} is not a token id") from error
        if not 0 <= token < num_prompts:
            raise ExportError(
                f"{path}: key {key!r}: token id does not fit the {num_prompts} prompt tokens (0-based)"
            )
        mask[token, _ids(path, key, value, segments, "segment")] = 0
    return mask


def _expect(path: Path, name: str, tensor: Tensor, shape: tuple[int | None, ...]) -> None:
    """Shape check with ``None`` as a wildcard; the error shows the expected shape with ``*``."""
    if tensor.dim() != len(shape) or any(
        w is not None and w != s for w, s in zip(shape, tensor.shape, strict=True)
    ):
        shown = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ExportError(f"{path}: key {name!r}: shape {list(tensor.shape)} does not fit {shown}")
    if not tensor.is_floating_point():
        raise ExportError(f"{path}: key {name!r}: dtype {tensor.dtype} is not a float type")

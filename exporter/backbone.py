"""The frozen backbone of an export: taken from a paper checkpoint, or loaded and checked for a native one.

An extracted backbone is a timm-layout safetensors file (Q, K, V fused into ``qkv``, LayerNorm eps
1e-6) whose header also records the architecture and fingerprint, so a native export or the
server can rebuild exactly that backbone.
"""

from __future__ import annotations

from pathlib import Path

from exporter.checkpoint import ExportError, LoadedTask, read_checkpoint
from runtime.core.backbone import RANDOM_WEIGHTS, Backbone, BackboneError, BackboneSpec, recorded_spec
from runtime.paper.layout import backbone_from_paper


def paper_backbone(task: LoadedTask) -> Backbone:
    """The backbone held inside a paper checkpoint, as a timm ViT."""
    if task.paper_state is None or task.spec is None:
        raise ExportError(f"{task.path}: a {task.kind} checkpoint holds no backbone")
    try:
        timm_state = backbone_from_paper(task.paper_state)
    except KeyError as error:
        raise ExportError(f"{task.path}: backbone key {error.args[0]!r} is missing") from error
    try:
        return Backbone.from_state_dict(task.spec, timm_state, source=f"{task.path} (paper checkpoint)")
    except BackboneError as error:
        raise ExportError(f"{task.path}: {error}") from error


def resolve_backbone(
    task: LoadedTask, weights: str | None = None, arch: str | None = None, seed: int = 0
) -> Backbone:
    """The backbone to export ``task`` against; refuses one other than the task was tuned on.

    Paper checkpoints carry their backbone; ``weights`` (a timm-layout file) is then checked against
    it. A native checkpoint needs ``weights`` (a file, or ``"random"`` with ``seed``) and a spec from
    ``arch``, the checkpoint's metadata or the weights file's header.
    """
    if task.kind == "paper":
        backbone = paper_backbone(task)
        if weights is not None:
            _check_same(task, backbone, weights)
        return backbone
    if weights is None:
        raise ExportError(
            f"{task.path}: a native checkpoint holds no backbone: pass --backbone FILE "
            "(or --backbone random --seed N for a demo)"
        )
    spec = _native_spec(task, weights, arch)
    try:
        backbone = Backbone.create(spec, weights, seed=seed)
    except BackboneError as error:
        raise ExportError(f"{task.path}: {error}") from error
    if task.backbone_fingerprint and task.backbone_fingerprint != backbone.fingerprint:
        raise ExportError(
            f"{task.path}: metadata 'backbone.fingerprint' {task.backbone_fingerprint} does not match "
            f"backbone {weights} (fingerprint {backbone.fingerprint})"
        )
    _check_fits(task, backbone)
    return backbone


def _native_spec(task: LoadedTask, weights: str, arch: str | None) -> BackboneSpec:
    sources: dict[str, BackboneSpec] = {}
    try:
        if arch is not None:
            sources["--arch"] = BackboneSpec.named(arch)
    except BackboneError as error:
        raise ExportError(f"--arch: {error}") from error
    if task.spec is not None:
        sources[f"{task.path} metadata 'backbone.spec'"] = task.spec
    if weights != RANDOM_WEIGHTS:
        recorded = read_backbone_spec(weights)
        if recorded is not None:
            sources[f"{weights} header"] = recorded
    if not sources:
        raise ExportError(
            f"{task.path}: the backbone architecture is unknown: pass --arch NAME "
            "(or record 'backbone.spec' in the checkpoint's metadata)"
        )
    specs = set(sources.values())
    if len(specs) > 1:
        shown = "; ".join(f"{where}: {spec.to_dict()}" for where, spec in sources.items())
        raise ExportError(f"{task.path}: backbone specs disagree: {shown}")
    return specs.pop()


def _check_same(task: LoadedTask, backbone: Backbone, weights: str) -> None:
    if weights == RANDOM_WEIGHTS:
        raise ExportError(
            f"{task.path}: --backbone random is for native checkpoints (this one has a backbone)"
        )
    try:
        given = Backbone.create(backbone.spec, weights)
    except BackboneError as error:
        raise ExportError(
            f"backbone {weights} does not match the backbone of {task.path}: {error}"
        ) from error
    if given.fingerprint != backbone.fingerprint:
        raise ExportError(
            f"backbone {weights} (fingerprint {given.fingerprint}) does not match the backbone of "
            f"{task.path} (fingerprint {backbone.fingerprint})"
        )


def _check_fits(task: LoadedTask, backbone: Backbone) -> None:
    spec, prompts = backbone.spec, task.prompts
    found = {
        "prompts": (prompts.prompts.shape[0], prompts.prompts.shape[2]),
        "kv_key": (prompts.kv_key.shape[0], prompts.kv_key.shape[1], prompts.kv_key.shape[3]),
    }
    want = {"prompts": (spec.depth, spec.embed_dim), "kv_key": (spec.depth, spec.num_heads, spec.head_dim)}
    if prompts.kv_key.shape[2] == 0:
        del found["kv_key"]
    for name, shape in found.items():
        if shape != want[name]:
            raise ExportError(
                f"{task.path}: key {name!r}: shape {list(getattr(prompts, name).shape)} does not fit "
                f"backbone {spec.name} ({spec.depth} layers, width {spec.embed_dim}, {spec.num_heads} heads)"
            )


def save_backbone(backbone: Backbone, path: str | Path) -> Path:
    """``Backbone.save``, with its errors reported as export errors."""
    try:
        return backbone.save(path)
    except BackboneError as error:
        raise ExportError(str(error)) from error


def read_backbone_spec(path: str | Path) -> BackboneSpec | None:
    """``recorded_spec``, with its errors reported as export errors."""
    try:
        return recorded_spec(path)
    except BackboneError as error:
        raise ExportError(str(error)) from error


def extract_backbone(
    checkpoint: str | Path, output: str | Path, num_heads: int | None = None, arch: str | None = None
) -> Backbone:
    """Read a paper checkpoint's frozen backbone and write it in timm's layout."""
    task = read_checkpoint(checkpoint, num_heads=num_heads, arch=arch)
    if task.kind != "paper":
        raise ExportError(f"{checkpoint}: a native checkpoint holds no backbone to extract")
    backbone = paper_backbone(task)
    save_backbone(backbone, output)
    return backbone

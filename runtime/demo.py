"""The embedded default: a seeded random ViT and seeded random demo tasks (not pretrained)."""

from __future__ import annotations

from pathlib import Path

from runtime.core.backbone import RANDOM_WEIGHTS, Backbone, BackboneSpec
from runtime.core.package import TaskPackage
from runtime.core.prompts import TaskPrompts

DEFAULT_BACKBONE = "vit_tiny_patch16_224"
DEFAULT_SEED = 0
# (prompt tokens, KV prompts, pruned tokens, pruned segments, classes): the paper's settings, pruned.
DEMO_SETTINGS = [(10, 5, 3, 40, 10), (32, 5, 12, 100, 100), (5, 5, 1, 10, 2), (10, 1, 0, 0, 37)]


def default_backbone() -> Backbone:
    return Backbone.create(DEFAULT_BACKBONE, RANDOM_WEIGHTS, seed=DEFAULT_SEED)


def demo_prompts(spec: BackboneSpec, index: int) -> TaskPrompts:
    """Seeded random task number ``index`` for ``spec``, cycling through ``DEMO_SETTINGS``."""
    prompts_n, kv_n, pruned_tokens, pruned_segments, classes = DEMO_SETTINGS[index % len(DEMO_SETTINGS)]
    return TaskPrompts.random(
        depth=spec.depth,
        embed_dim=spec.embed_dim,
        num_heads=spec.num_heads,
        num_prompts=prompts_n,
        num_kv=kv_n,
        num_classes=classes,
        seed=1000 + index,
        shared_kv=index % 2 == 0,
        pruned_tokens=pruned_tokens,
        pruned_segments=pruned_segments,
    )


def demo_package(backbone: Backbone, index: int, task_id: str | None = None) -> TaskPackage:
    """``demo_prompts`` packaged for ``backbone``, with labels ``class_<c>``."""
    prompts = demo_prompts(backbone.spec, index)
    labels = [f"class_{c}" for c in range(prompts.head_weight.shape[0])]
    return TaskPackage.from_prompts(
        task_id or f"demo-task-{index}",
        prompts,
        backbone,
        labels=labels,
        provenance={"source": "runtime.demo (seeded random, not trained)", "seed": 1000 + index},
    )


def write_demo_tasks(backbone: Backbone, directory: str | Path, count: int = 4) -> list[Path]:
    """Write ``count`` demo packages as ``DIR/<task id>.safetensors``."""
    directory = Path(directory)
    paths = []
    for index in range(count):
        package = demo_package(backbone, index)
        paths.append(package.save(directory / f"{package.task_id}.safetensors"))
    return paths

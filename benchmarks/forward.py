"""In-process forward benchmark: the plain backbone, the paper's sequence insertion, and ours.

Variants, all timed round-robin in one process at each batch size (ratios come from the same rounds):

* ``plain``: the timm backbone with no prompts plus one linear head: the floor ours is measured against.
* ``paper Np=.. T=..``: the paper's way, done efficiently (:class:`SequenceInsertion`): the visual
  prompts sit in the sequence ``[CLS, prompts, patches]`` and are overwritten before every layer,
  pruned tokens stay as zero vectors, key-value prompts are concatenated into SDPA. One task per batch.
* ``ours Np=.. T=..``: the runtime's engine with compiled prefixes, one task per batch (the registry
  holds only that task, so the prefix is exactly that task's).
* ``ours mixed-8``: one batch whose rows belong to 8 tasks of different prompt counts (fp32 and bf16).
* ``onnxruntime mixed-8``: the same mixed batch through the ONNX Runtime engine.

Prompt settings are the paper's (Np, T) in {(10, 5), (32, 5), (5, 5)}, pruned as in ``runtime.demo``.
Weights are seeded random (never downloaded), so top-1 agreement of bf16 with fp32 is measured on
random-weight models with random heads.

Full run (ViT-B/16, batches 1, 8, 32, fp32 + bf16, torch + onnxruntime) takes about 11 minutes on
a 2-core CPU; ``--quick`` (ViT-Ti, batches 1 and 4) takes well under a minute.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import (
    RESULTS_DIR,
    backbone_spec,
    benchmark_parser,
    config_record,
    interleaved,
    machine,
    paired_ratios,
    parse_config,
    print_machine,
    summarize,
    target,
)
from benchmarks.report import Panel, Report, Table, iqr_ms, publish
from runtime.core.backbone import Backbone, BackboneSpec
from runtime.core.package import TaskPackage
from runtime.core.prompts import TaskPrompts
from runtime.core.registry import TaskRegistry
from runtime.demo import DEMO_SETTINGS, demo_prompts
from runtime.engines.prefix_vit import PrefixViT
from runtime.engines.torch_engine import Engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Indices into runtime.demo.DEMO_SETTINGS of the paper's three (Np, T) settings, pruned.
PAPER_SETTINGS = (0, 1, 2)
PLAIN = "plain"
MIXED_TARGET = 1.03
BF16_SPEEDUP_TARGET = 2.5
BF16_AGREEMENT_TARGET = 0.99


def setting_name(index: int) -> str:
    prompts_n, kv_n, *_ = DEMO_SETTINGS[index % len(DEMO_SETTINGS)]
    return f"Np={prompts_n} T={kv_n}"


def plain_timm(backbone: Backbone) -> torch.nn.Module:
    """A fresh timm ViT holding the backbone's weights: the floor, untouched by the runtime's attention."""
    model = backbone.spec.build()
    model.load_state_dict(backbone.model.state_dict())
    return model.to(device=backbone.device, dtype=backbone.dtype).eval().requires_grad_(False)


class SequenceInsertion:
    """The paper's forward as a competent user would run it: timm's forward over ``[CLS, prompts, patches]``.

    Masks are multiplied in once, up front. Forward pre-hooks on timm's blocks put the prompts into
    the sequence (block 0 inserts them after CLS, every later block overwrites positions ``1..Np``;
    pruned tokens stay as zero vectors) and the shared prefix forward's binding concatenates the
    key-value prompts onto every layer's keys and values for SDPA (no mask: one task per batch).
    Runs in the backbone's dtype; logits come out in fp32.
    """

    def __init__(self, backbone: Backbone, prompts: TaskPrompts) -> None:
        dtype, device = backbone.dtype, backbone.device
        self.vit = PrefixViT(backbone.model)
        self.prompts = prompts.masked_prompts().to(device=device, dtype=dtype)
        self.kv_key = prompts.kv_key.to(device=device, dtype=dtype)
        self.kv_value = prompts.values.to(device=device, dtype=dtype)
        self.head_weight = prompts.head_weight.float().to(device)
        self.head_bias = prompts.head_bias.float().to(device)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        with self._prompts_in_sequence():
            features = self.vit.features(
                images.to(device=self.prompts.device, dtype=self.prompts.dtype), self._attend
            )
        return F.linear(features.float(), self.head_weight, self.head_bias)

    def _attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        batch = q.shape[0]
        keys = torch.cat([k, self.kv_key[layer].expand(batch, -1, -1, -1)], dim=2)
        values = torch.cat([v, self.kv_value[layer].expand(batch, -1, -1, -1)], dim=2)
        return F.scaled_dot_product_attention(q, keys, values)

    @contextmanager
    def _prompts_in_sequence(self) -> Iterator[None]:
        blocks = self.vit.model.blocks
        handles = [
            block.register_forward_pre_hook(partial(self._insert, layer))
            for layer, block in enumerate(blocks)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _insert(
        self, layer: int, block: torch.nn.Module, args: tuple[Tensor, ...]
    ) -> tuple[Tensor, ...] | None:
        (x,) = args
        if layer == 0:
            prompts = self.prompts[0].expand(x.shape[0], -1, -1)
            return (torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1),)
        # The previous block's output: ours to overwrite.
        x[:, 1 : 1 + self.prompts.shape[1]] = self.prompts[layer]
        return None


@dataclass
class ForwardConfig:
    backbone: str = "vit_base_patch16_224"
    batch_sizes: Sequence[int] = (1, 8, 32)
    dtypes: Sequence[str] = ("fp32", "bf16")
    engines: Sequence[str] = ("torch", "onnxruntime")
    mixed_tasks: int = 8
    warmup: int = 1
    reps: int = 5
    max_reps: int = 30
    budget_seconds: float = 60.0
    agreement_images: int = 64
    agreement_batch: int = 8
    threads: int | None = None
    seed: int = 0
    output_dir: Path | None = RESULTS_DIR
    spec: BackboneSpec | None = field(default=None, repr=False)  # overrides ``backbone`` (tests)

    def __post_init__(self) -> None:
        unknown = set(self.dtypes) - set(DTYPES)
        if unknown or not self.dtypes:
            raise ValueError(
                f"dtypes must be a non-empty subset of {sorted(DTYPES)}, got {list(self.dtypes)}"
            )
        if "fp32" not in self.dtypes:
            raise ValueError("dtypes must include fp32: every ratio is taken against the fp32 floor")
        if set(self.engines) - {"torch", "onnxruntime"} or "torch" not in self.engines:
            raise ValueError(f"engines must include torch, optionally onnxruntime; got {list(self.engines)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive, got {list(self.batch_sizes)}")
        if self.mixed_tasks < 1:
            raise ValueError(f"mixed_tasks must be at least 1, got {self.mixed_tasks}")


QUICK: dict[str, Any] = {
    "output_dir": RESULTS_DIR / "quick",
    "backbone": "vit_tiny_patch16_224",
    "batch_sizes": (1, 4),
    "reps": 3,
    "max_reps": 10,
    "budget_seconds": 1.0,
    "agreement_images": 16,
}


@dataclass
class Stack:
    """One dtype's models: backbone, plain timm, paper and single-task models per setting, mixed engine."""

    backbone: Backbone
    plain: torch.nn.Module
    paper: dict[int, SequenceInsertion]
    single: dict[int, Engine]
    mixed: Engine
    mixed_ids: list[str]


def build_stack(spec: BackboneSpec, dtype: torch.dtype, config: ForwardConfig) -> Stack:
    backbone = Backbone.create(spec, "random", seed=config.seed).to(dtype=dtype)
    paper, single = {}, {}
    for index in PAPER_SETTINGS:
        prompts = demo_prompts(spec, index)
        paper[index] = SequenceInsertion(backbone, prompts)
        registry = TaskRegistry(backbone)
        registry.add(TaskPackage.from_prompts(f"task-{index}", prompts, backbone))
        single[index] = Engine(backbone, registry)
    registry = TaskRegistry(backbone)
    ids = []
    for index in range(config.mixed_tasks):
        ids.append(
            registry.add(
                TaskPackage.from_prompts(f"task-{index}", demo_prompts(spec, index), backbone)
            ).task_id
        )
    return Stack(backbone, plain_timm(backbone), paper, single, Engine(backbone, registry), ids)


def row_tasks(ids: Sequence[str], batch: int, seed: int) -> list[str]:
    """``batch`` task ids spread evenly over ``ids`` in a seeded shuffled order."""
    rows = [ids[row % len(ids)] for row in range(batch)]
    random.Random(seed + batch).shuffle(rows)
    return rows


def variants_for(
    stacks: dict[str, Stack], onnx: Any, batch: int, config: ForwardConfig
) -> dict[str, Callable[[], object]]:
    spec = stacks["fp32"].backbone.spec
    images = torch.randn(
        batch, 3, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(config.seed + batch)
    )
    fp32 = stacks["fp32"]
    head_w = torch.randn(10, spec.embed_dim) * 0.05
    head_b = torch.zeros(10)
    variants: dict[str, Callable[[], object]] = {}
    for name, stack in stacks.items():
        model = stack.plain
        typed = images.to(stack.backbone.dtype)
        rows = row_tasks(stack.mixed_ids, batch, config.seed)

        def plain(model: torch.nn.Module = model, typed: Tensor = typed) -> Tensor:
            with torch.inference_mode():
                return F.linear(model(typed).float(), head_w, head_b)

        variants[f"{PLAIN} {name}"] = plain
        variants[f"ours mixed-{config.mixed_tasks} {name}"] = partial(stack.mixed.forward, images, rows)
    for index in PAPER_SETTINGS:
        variants[f"paper {setting_name(index)} fp32"] = partial(fp32.paper[index], images)
        ids = [f"task-{index}"] * batch
        variants[f"ours {setting_name(index)} fp32"] = partial(fp32.single[index].forward, images, ids)
    if onnx is not None:
        rows = row_tasks(fp32.mixed_ids, batch, config.seed)
        variants[f"onnxruntime mixed-{config.mixed_tasks} fp32"] = lambda: onnx.forward(images, rows)
    return variants


def bf16_agreement(stacks: dict[str, Stack], config: ForwardConfig) -> dict[str, Any]:
    """Top-1 agreement and logit error of the bf16 mixed-task engine against fp32 on the same inputs."""
    spec = stacks["fp32"].backbone.spec
    gen = torch.Generator().manual_seed(config.seed + 12345)
    agree = total = 0
    worst = 0.0
    for start in range(0, config.agreement_images, config.agreement_batch):
        count = min(config.agreement_batch, config.agreement_images - start)
        images = torch.randn(count, 3, spec.img_size, spec.img_size, generator=gen)
        rows = row_tasks(stacks["fp32"].mixed_ids, count, config.seed + start)
        exact = stacks["fp32"].mixed.forward(images, rows)
        approx = stacks["bf16"].mixed.forward(images, rows)
        for want, got in zip(exact, approx, strict=True):
            agree += int(want.argmax() == got.argmax())
            total += 1
            worst = max(worst, float((got - want).norm() / want.norm()))
    return {
        "images": total,
        "top1_agreement": agree / total,
        "max_relative_logit_error": worst,
        "note": "random-weight backbone and random heads (no pretrained weights are downloaded)",
    }


def run(config: ForwardConfig) -> dict[str, Any]:
    """Run the benchmark; writes results under ``config.output_dir`` (unless None) and returns them."""
    if config.threads:
        torch.set_num_threads(config.threads)
    spec = config.spec or backbone_spec(config.backbone)
    info = machine()
    print_machine(info)
    stacks = {name: build_stack(spec, DTYPES[name], config) for name in config.dtypes}
    onnx = None
    if "onnxruntime" in config.engines:
        from runtime.engines.onnxruntime_engine import OnnxEngine

        fp32 = stacks["fp32"]
        onnx = OnnxEngine(fp32.backbone, fp32.mixed.registry, threads=config.threads)
    cells = []
    for batch in config.batch_sizes:
        samples = interleaved(
            variants_for(stacks, onnx, batch, config),
            config.warmup,
            config.reps,
            config.max_reps,
            config.budget_seconds,
        )
        floor = samples[f"{PLAIN} fp32"]
        for name, seconds in samples.items():
            same_dtype_floor = samples[f"{PLAIN} {name.rsplit(' ', 1)[1]}"]
            cells.append(
                {
                    "batch": batch,
                    "variant": name,
                    "seconds": summarize(seconds),
                    "images_per_second": batch / summarize(seconds)["median"],
                    "ratio_to_plain_fp32": paired_ratios(seconds, floor),
                    "ratio_to_plain_same_dtype": paired_ratios(seconds, same_dtype_floor),
                    "samples": seconds,
                }
            )
        print(
            f"batch {batch}: "
            + ", ".join(f"{n} {summarize(s)['median'] * 1e3:.1f} ms" for n, s in samples.items())
        )
    results: dict[str, Any] = {
        "benchmark": "forward",
        "config": config_record(config),
        "backbone": spec.to_dict(),
        "machine": info,
        "cells": cells,
        "settings": {setting_name(i): list(DEMO_SETTINGS[i]) for i in PAPER_SETTINGS},
    }
    if "bf16" in stacks:
        results["bf16_agreement"] = bf16_agreement(stacks, config)
    results["targets"] = targets(results, spec, config)
    results["written"] = publish(build_report(results), results, config.output_dir)
    return results


def _cell(results: dict[str, Any], batch: int, variant: str) -> dict[str, Any]:
    return next(c for c in results["cells"] if c["batch"] == batch and c["variant"] == variant)


def targets(results: dict[str, Any], spec: BackboneSpec, config: ForwardConfig) -> list[dict[str, Any]]:
    """Where each of the issue's forward targets stands, per batch size (ratios are per-round medians)."""
    rows = []
    tokens = spec.num_patches + 1
    mixed = f"ours mixed-{config.mixed_tasks}"
    for batch in config.batch_sizes:
        ratio = _cell(results, batch, f"{mixed} fp32")["ratio_to_plain_fp32"]["median"]
        rows.append(
            target(
                f"mixed-task batch of {config.mixed_tasks} tasks / plain backbone, fp32",
                ratio,
                MIXED_TARGET,
                batch=batch,
            )
        )
        for index in PAPER_SETTINGS:
            ours = _cell(results, batch, f"ours {setting_name(index)} fp32")
            paper = _cell(results, batch, f"paper {setting_name(index)} fp32")
            prompts_n = DEMO_SETTINGS[index][0]
            rows.append(
                target(
                    f"ours / paper insertion, {setting_name(index)} (token share saved "
                    f"{prompts_n / (tokens + prompts_n):.1%})",
                    paired_ratios(ours["samples"], paper["samples"])["median"],
                    tokens / (tokens + prompts_n),
                    batch=batch,
                    medians_seconds={"ours": ours["seconds"]["median"], "paper": paper["seconds"]["median"]},
                )
            )
        if "bf16" in config.dtypes:
            fp32_mixed = _cell(results, batch, f"{mixed} fp32")["samples"]
            bf16_mixed = _cell(results, batch, f"{mixed} bf16")["samples"]
            rows.append(
                target(
                    f"bf16 speedup over fp32 ({mixed})",
                    paired_ratios(fp32_mixed, bf16_mixed)["median"],
                    BF16_SPEEDUP_TARGET,
                    smaller_is_better=False,
                    batch=batch,
                )
            )
    if "bf16_agreement" in results:
        agreement = results["bf16_agreement"]
        rows.append(
            target(
                f"bf16 top-1 agreement with fp32 (n={agreement['images']}, random weights)",
                agreement["top1_agreement"],
                BF16_AGREEMENT_TARGET,
                smaller_is_better=False,
                batch=config.agreement_batch,
            )
        )
    return rows


def build_report(results: dict[str, Any]) -> Report:
    """The tables and plots of a run, from its results alone."""
    latency = Table(
        text="Latency per batch (median, interquartile range, p95 over the interleaved rounds) and the "
        "per-round ratio to the plain fp32 backbone of the same round.",
        rows=[
            {
                "batch": cell["batch"],
                "variant": cell["variant"],
                "p50 ms": cell["seconds"]["median"] * 1e3,
                "IQR ms": iqr_ms(cell["seconds"]),
                "p95 ms": cell["seconds"]["p95"] * 1e3,
                "n": cell["seconds"]["n"],
                "images/s": cell["images_per_second"],
                "x plain fp32": cell["ratio_to_plain_fp32"]["median"],
            }
            for cell in results["cells"]
        ],
    )
    goals = Table(
        title="Targets", rows=results["targets"], columns=("target", "batch", "value", "limit", "status")
    )
    sections: list[Table | str] = [latency, goals]
    if "bf16_agreement" in results:
        a = results["bf16_agreement"]
        sections.append(
            f"bf16 vs fp32 (mixed-task engine): top-1 agreement {a['top1_agreement']:.3f} over {a['images']} "
            f"images, max relative logit error {a['max_relative_logit_error']:.3g}; {a['note']}."
        )
    return Report(
        name="forward",
        title=f"Forward benchmark: {results['backbone']['name']} (seeded random weights)",
        machine=results["machine"],
        sections=sections,
        panels=[
            Panel(
                latency.rows,
                x="batch",
                y=["images/s"],
                series=["variant"],
                xscale="log2",
                dashed=lambda variant: variant.endswith("bf16"),
            ),
            Panel(
                latency.rows,
                x="batch",
                y=["x plain fp32"],
                series=["variant"],
                xscale="log2",
                ylabel="time / plain fp32 (per-round median)",
                dashed=lambda variant: variant.endswith("bf16"),
                reference=1.0,
                legend=False,
            ),
        ],
    )


def parse_args(argv: Sequence[str] | None = None) -> ForwardConfig:
    parser = benchmark_parser("forward", __doc__, "ViT-Ti, batches 1 and 4, few repetitions (<1 min)")
    defaults = ForwardConfig()
    parser.add_argument(
        "--backbone", help=f"named ViT or 'tiny' (default {defaults.backbone}; quick: ViT-Ti)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", help=f"default {list(defaults.batch_sizes)}")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default fp32 bf16")
    parser.add_argument("--engines", nargs="+", choices=("torch", "onnxruntime"), help="default both")
    parser.add_argument(
        "--reps", type=int, help=f"minimum interleaved rounds per batch size ({defaults.reps})"
    )
    parser.add_argument("--max-reps", type=int, help=f"most rounds per batch size ({defaults.max_reps})")
    parser.add_argument(
        "--budget-seconds", type=float, help=f"keep adding rounds until this long ({defaults.budget_seconds})"
    )
    parser.add_argument("--warmup", type=int, help=f"unrecorded rounds first ({defaults.warmup})")
    parser.add_argument(
        "--agreement-images", type=int, help=f"images for bf16 agreement ({defaults.agreement_images})"
    )
    parser.add_argument(
        "--threads", type=int, help="torch / onnxruntime intra-op threads (default: library's)"
    )
    return parse_config(parser, argv, defaults, QUICK)


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

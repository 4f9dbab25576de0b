"""Scale benchmark: memory per loaded task, throughput with 1..1000 tasks loaded, load/replace latency.

* Memory: each task's bytes in the registry (``TaskRegistry.memory()``: prefix rows and head) against
  its package's tensor bytes, and the process's resident memory (VmRSS) before and after loading all
  tasks, per task: that also counts the table slack (tables grow by doubling, padded to the longest
  prefix) and whatever else a loaded task keeps alive.
* Throughput: one registry per count (1, 10, 100, 1000 tasks of the paper's settings), each running
  a mixed batch of 8 rows drawn from its own loaded tasks, interleaved round-robin. Task 0 has the
  longest prefix, so every registry attends over the same prefix length and the comparison isolates
  the number of loaded tasks.
* Load latency of one task into a registry of 10: ``load_package`` from disk, ``registry.add`` (hot
  load: compile and publish) and replacing a loaded task by a new version.
* One model per task: the memory such a deployment needs for the same tasks, computed (a full fp32
  backbone plus head per task) and measured (RSS growth per deep copy of the backbone, for a few).

Weights are seeded random ViTs and tasks (nothing is downloaded). The full run (ViT-B/16) takes about
6-10 minutes on a 2-core CPU and about 5 GB of memory; ``--quick`` (ViT-Ti, up to 100 tasks) well
under a minute.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import multiprocessing
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

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
    rss_bytes,
    summarize,
    target,
    verdict,
)
from benchmarks.report import Panel, Report, Table, iqr_ms, publish
from runtime.core.backbone import Backbone, BackboneSpec
from runtime.core.package import TaskPackage, load_package
from runtime.core.registry import TaskRegistry
from runtime.demo import demo_prompts
from runtime.engines.torch_engine import Engine

THROUGHPUT_TARGET = 0.95  # throughput with the most tasks loaded, as a share of one task's
MEMORY_TARGET = 1.2  # task bytes in memory / package tensor bytes
HOT_LOAD_TARGET_MS = 20.0
# Task i gets setting i + 1 of runtime.demo.DEMO_SETTINGS: task 0 is (Np 32, T 5), the longest prefix.
SETTING_OFFSET = 1
MIB = 2**20


@dataclass
class TasksConfig:
    backbone: str = "vit_base_patch16_224"
    loaded_counts: Sequence[int] = (1, 10, 100, 1000)
    batch: int = 8
    warmup: int = 1
    reps: int = 5
    max_reps: int = 30
    budget_seconds: float = 30.0
    load_reps: int = 50
    model_copies: int = 3
    threads: int | None = None
    seed: int = 0
    output_dir: Path | None = RESULTS_DIR
    spec: BackboneSpec | None = field(default=None, repr=False)  # overrides ``backbone`` (tests)

    def __post_init__(self) -> None:
        if not self.loaded_counts or min(self.loaded_counts) < 1:
            raise ValueError(f"loaded task counts must be positive, got {list(self.loaded_counts)}")
        if self.batch < 1 or self.load_reps < 1 or self.model_copies < 0:
            raise ValueError("batch and load_reps must be positive, model_copies non-negative")


QUICK: dict[str, Any] = {
    "output_dir": RESULTS_DIR / "quick",
    "backbone": "vit_tiny_patch16_224",
    "loaded_counts": (1, 10, 100),
    "reps": 3,
    "max_reps": 10,
    "budget_seconds": 2.0,
    "load_reps": 20,
    "model_copies": 2,
}


def make_package(backbone: Backbone, index: int) -> TaskPackage:
    prompts = demo_prompts(backbone.spec, index + SETTING_OFFSET)
    return TaskPackage.from_prompts(f"task-{index}", prompts, backbone)


@dataclass(frozen=True)
class PackageSize:
    """What the memory report needs of a package, so the package's tensors need not stay alive."""

    task_id: str
    setting: tuple[int, int, int]  # (prompt tokens, KV prompts, pruned tokens)
    kv_shared: bool
    tensor_bytes: int

    @classmethod
    def of(cls, package: TaskPackage) -> PackageSize:
        setting = (package.num_kept + package.num_pruned, package.num_kv, package.num_pruned)
        return cls(package.task_id, setting, package.kv_shared, package.tensor_bytes)


def measure_task_memory(backbone: Backbone, count: int) -> tuple[TaskRegistry, dict[str, Any]]:
    """Load ``count`` freshly made tasks into a new registry and account for the memory they take.

    Each package is dropped once loaded, so resident growth is what the registry keeps.
    """
    gc.collect()
    before = rss_bytes()
    registry = TaskRegistry(backbone)
    sizes = []
    for index in range(count):
        package = make_package(backbone, index)
        registry.add(package)
        sizes.append(PackageSize.of(package))
    del package
    gc.collect()
    grown = rss_bytes() - before
    report = registry.memory()
    tables = report.pop("__tables_allocated__")
    package_bytes = sum(size.tensor_bytes for size in sizes)
    per_task = [report[size.task_id] / size.tensor_bytes for size in sizes]
    memory = {
        "tasks": count,
        "package_tensor_bytes_total": package_bytes,
        "registry_task_bytes_total": sum(report.values()),
        "registry_tables_allocated_bytes": tables,
        "rss_growth_bytes": grown,
        "rss_growth_per_task_bytes": grown / count,
        "registry_bytes_over_package_bytes": {
            "median": sorted(per_task)[len(per_task) // 2],
            "min": min(per_task),
            "max": max(per_task),
        },
        "allocated_over_package_bytes": tables / package_bytes,
        "rss_over_package_bytes": grown / package_bytes,
        "by_setting": setting_memory(sizes, report),
    }
    return registry, memory


def setting_memory(sizes: Sequence[PackageSize], report: dict[str, int]) -> list[dict[str, Any]]:
    seen: dict[tuple[int, int, int], dict[str, Any]] = {}
    for size in sizes:
        if size.setting not in seen:
            seen[size.setting] = {
                "prompts": size.setting[0],
                "kv_prompts": size.setting[1],
                "pruned_tokens": size.setting[2],
                "kv_shared": size.kv_shared,
                "package_tensor_bytes": size.tensor_bytes,
                "registry_bytes": report[size.task_id],
                "ratio": report[size.task_id] / size.tensor_bytes,
            }
    return list(seen.values())


def throughput(backbone: Backbone, config: TasksConfig, largest: TaskRegistry) -> dict[str, Any]:
    """Images/s of one mixed batch per registry size, interleaved; ratios to the 1-task registry."""
    spec = backbone.spec
    images = torch.randn(
        config.batch, 3, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(config.seed)
    )
    registries: dict[int, TaskRegistry] = {}
    for count in config.loaded_counts:
        if count == len(largest):
            registries[count] = largest
            continue
        registry = TaskRegistry(backbone)
        for index in range(count):
            registry.add(make_package(backbone, index))
        registries[count] = registry
    rng = random.Random(config.seed)
    variants: dict[str, Callable[[], object]] = {}
    for count, registry in registries.items():
        rows = [f"task-{rng.randrange(count)}" for _ in range(config.batch)]
        engine = Engine(backbone, registry)
        variants[f"{count} loaded"] = partial(engine.forward, images, rows)
    samples = interleaved(variants, config.warmup, config.reps, config.max_reps, config.budget_seconds)
    base = samples[f"{min(config.loaded_counts)} loaded"]
    cells = []
    for count, registry in registries.items():
        seconds = samples[f"{count} loaded"]
        cells.append(
            {
                "loaded": count,
                "longest_prefix": registry.snapshot.longest_prefix,
                "seconds": summarize(seconds),
                "images_per_second": config.batch / summarize(seconds)["median"],
                "time_ratio_to_fewest": paired_ratios(seconds, base),
                "samples": seconds,
            }
        )
    return {"batch": config.batch, "cells": cells}


def load_latency(backbone: Backbone, config: TasksConfig) -> dict[str, Any]:
    """Milliseconds to read one package from disk, hot-load it into a 10-task registry, replace it."""
    registry = TaskRegistry(backbone)
    for index in range(10):
        registry.add(make_package(backbone, index))
    probe = make_package(backbone, 1)  # a (10, 5) task, the paper's most common setting
    timings: dict[str, list[float]] = {"load_package": [], "add": [], "replace": []}
    with tempfile.TemporaryDirectory(prefix="e2vpt-bench-load-") as scratch:
        path = probe.save(Path(scratch) / "probe.safetensors")
        load_package(path, backbone)
        for rep in range(config.load_reps + 1):
            begin = time.perf_counter()
            loaded = load_package(path, backbone)
            read = time.perf_counter() - begin
            fresh = dataclasses.replace(loaded, task_id=f"probe-{rep}")
            begin = time.perf_counter()
            registry.add(fresh)
            added = time.perf_counter() - begin
            registry.remove(fresh.task_id)
            begin = time.perf_counter()
            registry.add(dataclasses.replace(loaded, task_id="probe-replaced"))
            replaced = time.perf_counter() - begin
            if rep:  # the first round warms caches and allocators
                timings["load_package"].append(read)
                timings["add"].append(added)
                timings["replace"].append(replaced)
    result: dict[str, Any] = {
        name: {k: v * 1e3 if k != "n" else v for k, v in summarize(values).items()}
        for name, values in timings.items()
    }
    result["package_file_bytes"] = path.stat().st_size if path.exists() else None
    result["prefix_len"] = registry.get("probe-replaced").prefix_len
    result["hot_load_status"] = verdict(result["add"]["median"], HOT_LOAD_TARGET_MS)
    return result


def copy_growth(spec: BackboneSpec, seed: int, copies: int) -> float:
    """Resident memory growth per deep copy of a freshly built backbone, in bytes."""
    backbone = Backbone.create(spec, "random", seed=seed)
    gc.collect()
    before = rss_bytes()
    models = [copy.deepcopy(backbone.model) for _ in range(copies)]
    grown = rss_bytes() - before
    del models
    return grown / copies


def model_per_task(backbone: Backbone, config: TasksConfig, ours: dict[str, Any]) -> dict[str, Any]:
    """Memory of one full model per task: computed for every count, measured for a few deep copies."""
    params = sum(t.numel() * t.element_size() for t in backbone.model.state_dict().values())
    measured = None
    if config.model_copies:
        # A fresh process: this one's freed heap would be reused by the copies and hide their size.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            measured = pool.apply(copy_growth, (backbone.spec, config.seed, config.model_copies))
    per_task = ours["rss_growth_per_task_bytes"]
    rows = []
    for count in config.loaded_counts:
        rows.append(
            {
                "tasks": count,
                "one_model_per_task_bytes": count * params,
                "ours_bytes": params + count * per_task,
                "ratio": count * params / (params + count * per_task),
            }
        )
    return {
        "backbone_weight_bytes": params,
        "measured_rss_per_copy_bytes": measured,
        "copies_measured": config.model_copies,
        "ours_per_task_bytes_used": per_task,
        "by_count": rows,
    }


def run(config: TasksConfig) -> dict[str, Any]:
    """Run the benchmark; writes results under ``config.output_dir`` (unless None) and returns them."""
    if config.threads:
        torch.set_num_threads(config.threads)
    spec = config.spec or backbone_spec(config.backbone)
    info = machine()
    print_machine(info)
    backbone = Backbone.create(spec, "random", seed=config.seed)
    started = time.perf_counter()
    largest, memory = measure_task_memory(backbone, max(config.loaded_counts))
    memory["load_all_seconds"] = time.perf_counter() - started
    print(
        f"loaded {len(largest)} tasks in {memory['load_all_seconds']:.1f} s; "
        f"RSS +{memory['rss_growth_bytes'] / MIB:.1f} MiB"
    )
    speed = throughput(backbone, config, largest)
    for cell in speed["cells"]:
        print(f"{cell['loaded']:>5} loaded: {cell['images_per_second']:.2f} images/s (batch {config.batch})")
    latency = load_latency(backbone, config)
    print(
        f"hot load p50 {latency['add']['median']:.2f} ms, replace p50 {latency['replace']['median']:.2f} ms"
    )
    results: dict[str, Any] = {
        "benchmark": "tasks",
        "config": config_record(config),
        "backbone": spec.to_dict(),
        "machine": info,
        "memory": memory,
        "throughput": speed,
        "load_latency": latency,
        "model_per_task": model_per_task(backbone, config, memory),
    }
    results["targets"] = targets(results)
    results["written"] = publish(build_report(results), results, config.output_dir)
    return results


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    cells = results["throughput"]["cells"]
    most = max(cells, key=lambda c: c["loaded"])
    fewest = min(cells, key=lambda c: c["loaded"])
    memory = results["memory"]
    return [
        target(
            f"throughput with {most['loaded']} tasks / with {fewest['loaded']}",
            1 / most["time_ratio_to_fewest"]["median"],
            THROUGHPUT_TARGET,
            smaller_is_better=False,
        ),
        target(
            "task bytes in the registry / package tensor bytes (median task)",
            memory["registry_bytes_over_package_bytes"]["median"],
            MEMORY_TARGET,
        ),
        target(
            "resident memory growth per task / package tensor bytes",
            memory["rss_over_package_bytes"],
            MEMORY_TARGET,
        ),
        target("one-task hot load p50 (ms)", results["load_latency"]["add"]["median"], HOT_LOAD_TARGET_MS),
    ]


def build_report(results: dict[str, Any]) -> Report:
    """The tables and plots of a run, from its results alone."""
    memory, latency, per_task = results["memory"], results["load_latency"], results["model_per_task"]
    batch = results["throughput"]["batch"]
    throughput = Table(
        title=f"Throughput by loaded tasks (mixed batch of {batch} rows from the loaded tasks)",
        rows=[
            {
                "tasks loaded": c["loaded"],
                "longest prefix": c["longest_prefix"],
                "p50 ms": c["seconds"]["median"] * 1e3,
                "IQR ms": iqr_ms(c["seconds"]),
                "n": c["seconds"]["n"],
                "images/s": c["images_per_second"],
                "time x fewest": c["time_ratio_to_fewest"]["median"],
            }
            for c in results["throughput"]["cells"]
        ],
    )
    settings = Table(
        title=f"Memory of {memory['tasks']} loaded tasks",
        rows=[
            {
                "setting (Np, T, pruned)": f"({s['prompts']}, {s['kv_prompts']}, {s['pruned_tokens']})",
                "KV shared": s["kv_shared"],
                "package bytes": s["package_tensor_bytes"],
                "registry bytes": s["registry_bytes"],
                "ratio": s["ratio"],
            }
            for s in memory["by_setting"]
        ],
        note=f"All {memory['tasks']} tasks: package tensors "
        f"{memory['package_tensor_bytes_total'] / MIB:.1f} MiB, registry task bytes "
        f"{memory['registry_task_bytes_total'] / MIB:.1f} MiB, tables allocated "
        f"{memory['registry_tables_allocated_bytes'] / MIB:.1f} MiB, resident memory growth "
        f"{memory['rss_growth_bytes'] / MIB:.1f} MiB "
        f"({memory['rss_over_package_bytes']:.2f}x the package bytes).",
    )
    loading = Table(
        title="Loading one task (registry of 10, ms)",
        rows=[
            {
                "step": step,
                "p50": latency[step]["median"],
                "p95": latency[step]["p95"],
                "max": latency[step]["max"],
                "n": latency[step]["n"],
            }
            for step in ("load_package", "add", "replace")
        ],
    )
    copy_bytes = per_task["measured_rss_per_copy_bytes"]
    measured = (
        f"; measured resident growth per deep copy: {copy_bytes / MIB:.1f} MiB "
        f"({per_task['copies_measured']} copies)."
        if copy_bytes is not None
        else "."
    )
    memory_by_count = Table(
        title="One model per task vs ours",
        text=f"A full backbone is {per_task['backbone_weight_bytes'] / MIB:.1f} MiB of weights{measured}",
        rows=[
            {
                "tasks": r["tasks"],
                "one model per task MiB": r["one_model_per_task_bytes"] / MIB,
                "ours MiB": r["ours_bytes"] / MIB,
                "ratio": r["ratio"],
            }
            for r in per_task["by_count"]
        ],
    )
    goals = Table(title="Targets", rows=results["targets"], columns=("target", "value", "limit", "status"))
    return Report(
        name="tasks",
        title=f"Task scale benchmark: {results['backbone']['name']} (seeded random weights), fp32",
        machine=results["machine"],
        sections=[throughput, settings, loading, memory_by_count, goals],
        panels=[
            Panel(
                throughput.rows,
                x="tasks loaded",
                y=["images/s"],
                xscale="log",
                ylabel=f"images/s (mixed batch of {batch})",
                ymin=0,
                legend=False,
            ),
            Panel(
                memory_by_count.rows,
                x="tasks",
                y=["one model per task MiB", "ours MiB"],
                xscale="log",
                yscale="log",
                ylabel="MiB",
            ),
        ],
    )


def parse_args(argv: Sequence[str] | None = None) -> TasksConfig:
    parser = benchmark_parser("tasks", __doc__, "ViT-Ti, up to 100 tasks, few repetitions")
    defaults = TasksConfig()
    parser.add_argument(
        "--backbone", help=f"named ViT or 'tiny' (default {defaults.backbone}; quick: ViT-Ti)"
    )
    parser.add_argument(
        "--loaded-counts", type=int, nargs="+", help=f"default {list(defaults.loaded_counts)}"
    )
    parser.add_argument("--batch", type=int, help=f"rows per mixed batch ({defaults.batch})")
    parser.add_argument("--reps", type=int, help=f"minimum interleaved rounds ({defaults.reps})")
    parser.add_argument(
        "--budget-seconds", type=float, help=f"keep adding rounds until this long ({defaults.budget_seconds})"
    )
    parser.add_argument("--load-reps", type=int, help=f"load/replace repetitions ({defaults.load_reps})")
    parser.add_argument(
        "--model-copies", type=int, help=f"backbone copies measured ({defaults.model_copies})"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    return parse_config(parser, argv, defaults, QUICK)


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

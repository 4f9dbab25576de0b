"""Shared pieces of the CPU benchmarks: machine description, interleaved timing, statistics, outputs.

Every benchmark compares variants by running them round-robin (one call of each per repetition), so a
ratio between two variants is taken under the same machine conditions; absolute times on a shared
machine move around, the ratios much less.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from runtime.core.backbone import ARCHITECTURES, BackboneSpec
from runtime.core.files import atomic_write

ConfigT = TypeVar("ConfigT")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def backbone_spec(name: str) -> BackboneSpec:
    """A named timm architecture (``vit_base_patch16_224``, ...) or ``tiny`` (a 2-layer test ViT)."""
    if name == "tiny":
        return BackboneSpec(embed_dim=64, depth=2, num_heads=4, img_size=32, patch_size=8, name="tiny")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown backbone {name!r}; known: tiny, {', '.join(sorted(ARCHITECTURES))}")
    return BackboneSpec.named(name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The vector ISA flags that decide fp32/bf16 speed (AVX-512, AMX, bf16)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2")) or "bf16" in f)
    except OSError:
        pass
    return []


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and with which thread settings and library versions."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    for module, distribution in (
        ("timm", "timm"),
        ("onnxruntime", "onnxruntime"),
        ("grpc", "grpcio"),
        ("tritonclient", "tritonclient"),
    ):
        try:
            info[module] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            info[module] = None
    return info


def print_machine(info: Mapping[str, Any]) -> None:
    print(
        f"machine: {info['cpu_model']}, {info['usable_cores']} usable cores, "
        f"torch threads {info['torch_threads']} (interop {info['torch_interop_threads']}), "
        f"OMP_NUM_THREADS={info['omp_num_threads']}, load average {info['load_average_at_start']}"
    )
    print(
        f"versions: python {info['python']}, torch {info['torch']}, timm {info['timm']}, "
        f"onnxruntime {info['onnxruntime']}, grpc {info['grpc']}, tritonclient {info['tritonclient']}"
    )


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of ``samples``."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, tail percentiles and extremes of a list of timings (same unit out as in)."""
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "p25": percentile(samples, 25),
        "p75": percentile(samples, 75),
        "p95": percentile(samples, 95),
        "p99": percentile(samples, 99),
        "min": min(samples),
        "max": max(samples),
    }


def interleaved(
    variants: Mapping[str, Callable[[], object]],
    warmup: int,
    min_reps: int,
    max_reps: int | None = None,
    budget_seconds: float = 0.0,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, run round-robin: one call of every variant per repetition.

    Runs ``warmup`` unrecorded rounds, then at least ``min_reps`` rounds and more while the recorded
    rounds took less than ``budget_seconds`` (up to ``max_reps``): cheap cells get more samples.
    The order rotates every round so no variant always runs right after the same neighbour.
    """
    if min_reps < 1:
        raise ValueError(f"min_reps must be at least 1, got {min_reps}")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (
        time.perf_counter() - started < budget_seconds and (max_reps is None or rounds < max_reps)
    ):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            begin = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - begin)
        rounds += 1
    return samples


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Per-round ratios of two interleaved variants: median and quartiles (noise cancels per round)."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {
        "median": statistics.median(ratios),
        "p25": percentile(ratios, 25),
        "p75": percentile(ratios, 75),
        "n": len(ratios),
    }


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/status (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, limit: float, smaller_is_better: bool = True) -> str:
    met = value <= limit if smaller_is_better else value >= limit
    return "met" if met else "MISSED"


def write_results(
    name: str,
    payload: dict[str, Any],
    markdown: str,
    plot: Callable[[Path], None] | None,
    output_dir: Path = RESULTS_DIR,
) -> dict[str, Path]:
    """``<name>.json`` and ``<name>.md`` (atomically) and ``<name>.png`` when matplotlib is installed."""
    output_dir = Path(output_dir)
    paths = {
        "json": atomic_write(
            output_dir / f"{name}.json", lambda: (json.dumps(payload, indent=2, default=str) + "\n").encode()
        ),
        "md": atomic_write(output_dir / f"{name}.md", lambda: (markdown.rstrip() + "\n").encode()),
    }
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            print("matplotlib is not installed (pip install '.[bench]'): no plot written")
            return paths
        target = output_dir / f"{name}.png"
        temporary = output_dir / f".{name}.tmp.png"
        plot(temporary)
        os.replace(temporary, target)
        paths["png"] = target
    return paths


def benchmark_parser(name: str, description: str | None, quick_help: str) -> argparse.ArgumentParser:
    """``python -m benchmarks.<name>``'s parser with the options every benchmark has."""
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--output-dir", type=Path, help=f"default {RESULTS_DIR} (quick: its quick/ folder)")
    return parser


def log2_axes(axes: Sequence[tuple[Any, str]], xlabel: str) -> None:
    """Log-2 x axis, labels and a light grid on each ``(axis, ylabel)``."""
    for axis, label in axes:
        axis.set_xscale("log", base=2)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)


def with_options(config: ConfigT, args: argparse.Namespace) -> ConfigT:
    """``config`` with every field the command line set (options are named like the fields)."""
    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(config)
        if getattr(args, field.name, None) is not None
    }
    return dataclasses.replace(config, **given)


def save_figure(figure: Any, path: Path, title: str) -> None:
    """Title, lay out, write as PNG and release a matplotlib figure."""
    import matplotlib.pyplot as plt

    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)


def machine_markdown(info: Mapping[str, Any]) -> str:
    return (
        f"Machine: {info['cpu_model']}, {info['usable_cores']} usable cores, torch threads "
        f"{info['torch_threads']}; torch {info['torch']}, onnxruntime {info['onnxruntime']}; "
        f"load average at start {info['load_average_at_start']}."
    )

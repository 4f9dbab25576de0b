"""Shared pieces of the benchmarks: machine description, interleaved timing, statistics, targets, the
command line and a served server's port and readiness. Reports are written by ``benchmarks.report``.

Every benchmark compares variants by running them round-robin (one call of each per repetition), so a
ratio between two variants is taken under the same machine conditions; absolute times on a shared
machine move around, the ratios much less.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from runtime.core.backbone import ARCHITECTURES, BackboneSpec

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")

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
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    for module, distribution in (
        ("timm", "timm"),
        ("onnxruntime", "onnxruntime"),
        ("grpc", "grpcio"),
        ("tritonclient", "tritonclient"),
        ("triton", "triton"),
    ):
        try:
            info[module] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            info[module] = None
    return info


def print_machine(info: Mapping[str, Any]) -> None:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    print(
        f"machine: {info['cpu_model']}{gpu}, {info['usable_cores']} usable cores, "
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


def verdict(value: float, limit: float, smaller_is_better: bool = True) -> str:
    met = value <= limit if smaller_is_better else value >= limit
    return "met" if met else "MISSED"


def target(
    name: str, value: float, limit: float, smaller_is_better: bool = True, **details: Any
) -> dict[str, Any]:
    """One row of a targets table: where ``value`` stands against the project's ``limit``."""
    return {
        "target": name,
        **details,
        "value": value,
        "limit": f"{'<=' if smaller_is_better else '>='} {limit:.4g}",
        "status": verdict(value, limit, smaller_is_better),
    }


def benchmark_parser(name: str, description: str | None, quick_help: str) -> argparse.ArgumentParser:
    """``python -m benchmarks.<name>``'s parser with the options every benchmark has.

    Options are named like the fields of the benchmark's config dataclass (see :func:`parse_config`).
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--output-dir", type=Path, help=f"default {RESULTS_DIR} (quick: its quick/ folder)")
    parser.add_argument("--seed", type=int, help="seed of the random weights and inputs (default 0)")
    return parser


def parse_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, default: ConfigT, quick: Mapping[str, Any]
) -> ConfigT:
    """``default``, with ``quick``'s fields under --quick, then every option the command line gives."""
    args = parser.parse_args(argv)
    config = dataclasses.replace(default, **quick) if args.quick else default
    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(config)
        if getattr(args, field.name, None) is not None
    }
    return dataclasses.replace(config, **given)


def config_record(config: DataclassInstance) -> dict[str, Any]:
    """A config as the results record it: every field but test-only overrides and where files go."""
    return {k: v for k, v in vars(config).items() if k not in ("spec", "output_dir")}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a server started next to bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerExitedError(RuntimeError):
    """The server process ended before it was ready."""


def wait_until_ready(
    address: str, process: subprocess.Popen[Any], timeout: float, task: str | None = None
) -> None:
    """Poll the KServe v2 server at ``address`` until it (and ``task``, when named) is ready.

    Raises :class:`ServerExitedError` (with its stderr, when piped) if ``process`` ends first and
    ``TimeoutError`` after ``timeout`` seconds.
    """
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + timeout
    with grpcclient.InferenceServerClient(address) as client:
        while True:
            if process.poll() is not None:
                output = process.stderr.read() if process.stderr is not None else ""
                text = output.decode(errors="replace") if isinstance(output, bytes) else output
                raise ServerExitedError(
                    f"server exited with {process.returncode} before it was ready\n{text}"
                )
            try:
                if client.is_model_ready(task) if task else client.is_server_ready():
                    return
            except InferenceServerException:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on {address} not ready after {timeout} s")
            time.sleep(0.1)


@contextmanager
def served_subprocess(
    serve_args: Sequence[str],
    port: int,
    timeout: float,
    task: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """``python -m runtime serve SERVE_ARGS`` from the repository root, warnings only; yields its gRPC
    address (``127.0.0.1:port``) once ready (and ``task``, when named), and terminates it on exit.

    Its output goes to a temporary file, shown in the error if it exits before it is ready."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "runtime", "--log-level", "WARNING", "serve", *serve_args]
    python_path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=root, env=environment, stdout=log, stderr=subprocess.STDOUT)
        try:
            address = f"127.0.0.1:{port}"
            try:
                wait_until_ready(address, process, timeout, task)
            except ServerExitedError as error:
                log.seek(0)
                raise RuntimeError(f"{error}{log.read().decode()[-3000:]}") from None
            yield address
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

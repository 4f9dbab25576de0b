"""End-to-end serving benchmark over gRPC on loopback, driven by an async ``tritonclient`` load generator.

A real server (``python -m runtime serve``, a subprocess on 127.0.0.1 and a free port) holds the
benchmark's tasks (seeded random ViT and tasks: nothing is downloaded). For every batching mode the
server is started once; then every cell (number of tasks the traffic spreads over, popularity, client
concurrency) sends closed-loop requests, one 1-image ``input`` (FP32, already normalized) each:

* modes: ``mixed`` (the server's batcher: one queue, batches mix tasks; max batch 32, 5 ms delay)
  and ``none`` (max batch 1, no delay). Batching per task is not a server option, so it is reported
  as not measured rather than emulated.
* tasks 1 / 8 / 64 with uniform or Zipf (s = 1.1) popularity; concurrency 1..64.
* latency p50/p95/p99 per request (client side), throughput in requests/s.

gRPC overhead at concurrency 1: blocks of in-process ``Engine.forward`` calls of one image (same
backbone, same tasks, so the same prefix) alternate with blocks of round trips to the no-batching
server; the difference of the medians is the serving overhead (target: <= 2 ms for ViT-Ti).

The load generator shares the CPU with the server, as any loopback client does. The full run (ViT-Ti)
takes about 8-10 minutes; ``--quick`` about a minute.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    RESULTS_DIR,
    backbone_spec,
    benchmark_parser,
    config_record,
    free_port,
    machine,
    parse_config,
    percentile,
    print_machine,
    served_subprocess,
    summarize,
    verdict,
)
from benchmarks.report import Panel, Report, Table, publish
from runtime.core.backbone import Backbone, BackboneSpec
from runtime.core.registry import TaskRegistry
from runtime.demo import demo_package
from runtime.engines.torch_engine import Engine


@dataclass(frozen=True)
class BatchingMode:
    """Server settings of one batching mode."""

    max_batch_size: int
    max_queue_delay_ms: float
    batching: str = "mixed"


MODES: dict[str, BatchingMode] = {
    "mixed": BatchingMode(32, 5.0, "mixed"),
    "per-task": BatchingMode(32, 5.0, "per-task"),
    "none": BatchingMode(1, 0.0),
}
POPULARITY = ("uniform", "zipf")
OVERHEAD_TARGET_MS = 2.0
READY_TIMEOUT_SECONDS = 180.0


@dataclass
class ServeConfig:
    backbone: str = "vit_tiny_patch16_224"
    modes: Sequence[str] = ("mixed", "per-task", "none")
    task_counts: Sequence[int] = (1, 8, 64)
    popularity: Sequence[str] = POPULARITY
    concurrency: Sequence[int] = (1, 4, 16, 64)
    requests_per_cell: int = 600
    seconds_per_cell: float = 5.0
    warmup_requests: int = 16
    zipf_exponent: float = 1.1
    overhead_blocks: int = 10
    overhead_block_size: int = 10
    server: str = "subprocess"
    threads: int | None = None
    seed: int = 0
    output_dir: Path | None = RESULTS_DIR
    spec: BackboneSpec | None = field(default=None, repr=False)  # tiny test specs: in-process server only

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(MODES)
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}; choose from {list(MODES)}")
        if set(self.popularity) - set(POPULARITY):
            raise ValueError(f"popularity must be from {POPULARITY}, got {list(self.popularity)}")
        if self.server not in ("subprocess", "inprocess"):
            raise ValueError(f"server must be 'subprocess' or 'inprocess', got {self.server!r}")
        if self.spec is not None and self.server == "subprocess":
            raise ValueError(
                "a custom spec cannot be passed to `python -m runtime serve`; use server='inprocess'"
            )
        if min(self.task_counts, default=0) < 1 or min(self.concurrency, default=0) < 1:
            raise ValueError("task counts and concurrency levels must be positive")


QUICK: dict[str, Any] = {
    "output_dir": RESULTS_DIR / "quick",
    "task_counts": (1, 8),
    "concurrency": (1, 8),
    "requests_per_cell": 60,
    "seconds_per_cell": 2.0,
    "warmup_requests": 4,
    "overhead_blocks": 3,
    "overhead_block_size": 5,
}


def popularity_weights(kind: str, count: int, exponent: float) -> list[float]:
    if kind == "uniform":
        return [1.0] * count
    return [1.0 / (rank + 1) ** exponent for rank in range(count)]


@contextmanager
def subprocess_server(config: ServeConfig, task_dir: Path, mode: BatchingMode) -> Iterator[str]:
    """``python -m runtime serve`` on a free loopback port; yields its address once it is ready."""
    port = free_port()
    arguments = [
        "--backbone", config.backbone, "--weights", "random", "--seed", str(config.seed), "--device", "cpu",
        "--task-dir", str(task_dir), "--model-control-mode", "explicit", "--load-task", "*",
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--no-http",
        "--max-batch-size", str(mode.max_batch_size), "--max-queue-delay-ms", str(mode.max_queue_delay_ms),
        "--batching", mode.batching, "--max-queue-size", "1024",
    ]  # fmt: skip
    if config.threads:
        arguments += ["--threads", str(config.threads)]
    with served_subprocess(arguments, port, READY_TIMEOUT_SECONDS) as address:
        yield address


@contextmanager
def inprocess_server(backbone: Backbone, task_dir: Path, mode: BatchingMode) -> Iterator[str]:
    """The server on its own event-loop thread in this process (tiny test models)."""
    from runtime.serving.server import BackgroundServer, InferenceServer, ServerConfig

    settings = ServerConfig(
        host="127.0.0.1",
        port=0,
        task_dir=task_dir,
        model_control_mode="explicit",
        load_tasks=["*"],
        max_batch_size=mode.max_batch_size,
        max_queue_delay_ms=mode.max_queue_delay_ms,
        batching=mode.batching,
        max_queue_size=1024,
        grace_seconds=5.0,
    )
    with BackgroundServer(InferenceServer(Engine(backbone, TaskRegistry(backbone)), settings)) as server:
        yield f"127.0.0.1:{server.port}"


def request_input(spec: BackboneSpec, seed: int) -> Any:
    from tritonclient.grpc import aio as aioclient

    size = spec.img_size
    pixels = np.random.default_rng(seed).standard_normal((1, 3, size, size), dtype=np.float32)
    tensor = aioclient.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    return tensor


async def closed_loop(
    address: str,
    tensor: Any,
    task_ids: Sequence[str],
    weights: Sequence[float],
    concurrency: int,
    requests: int,
    seconds: float,
    seed: int,
) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when the last one returns."""
    from tritonclient.grpc import aio as aioclient
    from tritonclient.utils import InferenceServerException

    rng = random.Random(seed)
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    async with aioclient.InferenceServerClient(address) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                issued += 1
                task = rng.choices(task_ids, weights)[0]
                begin = time.perf_counter()
                try:
                    await client.infer(task, [tensor])
                except InferenceServerException as error:
                    errors.append(str(error))
                    continue
                latencies.append(time.perf_counter() - begin)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed}


def latency_summary(latencies: Sequence[float], elapsed: float) -> dict[str, Any]:
    if not latencies:
        return {"completed": 0, "throughput_rps": 0.0}
    return {
        "completed": len(latencies),
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p95_ms": percentile(latencies, 95) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3,
    }


def run_mode(
    address: str, config: ServeConfig, spec: BackboneSpec, task_ids: list[str], mode: str
) -> list[dict]:
    tensor = request_input(spec, config.seed)
    cells = []
    for tasks in config.task_counts:
        for kind in config.popularity if tasks > 1 else ("uniform",):
            weights = popularity_weights(kind, tasks, config.zipf_exponent)
            for concurrency in config.concurrency:
                chosen = task_ids[:tasks]
                warm = max(config.warmup_requests, concurrency)
                asyncio.run(
                    closed_loop(address, tensor, chosen, weights, concurrency, warm, 60.0, config.seed)
                )
                outcome = asyncio.run(
                    closed_loop(
                        address,
                        tensor,
                        chosen,
                        weights,
                        concurrency,
                        config.requests_per_cell,
                        config.seconds_per_cell,
                        config.seed + concurrency,
                    )
                )
                cell = {
                    "mode": mode,
                    "tasks": tasks,
                    "popularity": kind,
                    "concurrency": concurrency,
                    "errors": len(outcome["errors"]),
                    "first_error": outcome["errors"][0] if outcome["errors"] else None,
                    **latency_summary(outcome["latencies"], outcome["elapsed"]),
                }
                cells.append(cell)
                print(
                    f"{mode:>6} tasks {tasks:>3} {kind:>7} concurrency {concurrency:>3}: "
                    f"{cell.get('throughput_rps', 0):7.1f} req/s, "
                    f"p50 {cell.get('p50_ms', float('nan')):7.2f} ms, "
                    f"p99 {cell.get('p99_ms', float('nan')):7.2f} ms, errors {cell['errors']}"
                )
    return cells


def server_times(address: str, task_id: str) -> dict[str, int]:
    """The server's cumulative per-request durations (ns) for ``task_id``, from ModelStatistics."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    try:
        stats = client.get_inference_statistics(model_name=task_id).model_stats[0].inference_stats
    finally:
        client.close()
    return {
        "count": stats.success.count,
        "request": stats.success.ns,
        "queue": stats.queue.ns,
        "compute_input": stats.compute_input.ns,
        "compute_infer": stats.compute_infer.ns,
        "compute_output": stats.compute_output.ns,
    }


def grpc_overhead(address: str, config: ServeConfig, engine: Engine, task_id: str) -> dict[str, Any]:
    """Round trip at concurrency 1 vs the in-process forward of the same image, in alternating blocks."""
    from tritonclient.grpc import aio as aioclient

    spec = engine.backbone.spec
    tensor = request_input(spec, config.seed)
    image = torch.from_numpy(
        np.random.default_rng(config.seed).standard_normal(
            (1, 3, spec.img_size, spec.img_size), dtype=np.float32
        )
    )
    local: list[float] = []
    remote: list[float] = []

    async def measure() -> None:
        async with aioclient.InferenceServerClient(address) as client:
            for block in range(config.overhead_blocks + 1):
                forwards, trips = [], []
                for _ in range(config.overhead_block_size):
                    begin = time.perf_counter()
                    engine.forward(image, [task_id])
                    forwards.append(time.perf_counter() - begin)
                for _ in range(config.overhead_block_size):
                    begin = time.perf_counter()
                    await client.infer(task_id, [tensor])
                    trips.append(time.perf_counter() - begin)
                if block:  # the first block warms both paths up
                    local.extend(forwards)
                    remote.extend(trips)

    before = server_times(address, task_id)
    asyncio.run(measure())
    after = server_times(address, task_id)
    served = max(after["count"] - before["count"], 1)
    inside = {k: (after[k] - before[k]) / served / 1e6 for k in after if k != "count"}
    overhead_ms = (statistics.median(remote) - statistics.median(local)) * 1e3
    return {
        "in_process_forward_ms": {k: v * 1e3 if k != "n" else v for k, v in summarize(local).items()},
        "round_trip_ms": {k: v * 1e3 if k != "n" else v for k, v in summarize(remote).items()},
        "overhead_p50_ms": overhead_ms,
        "server_side_mean_ms": inside,
        "limit_ms": OVERHEAD_TARGET_MS,
        "status": verdict(overhead_ms, OVERHEAD_TARGET_MS),
    }


def run(config: ServeConfig) -> dict[str, Any]:
    """Run the benchmark; writes results under ``config.output_dir`` (unless None) and returns them."""
    if config.threads:
        torch.set_num_threads(config.threads)
    spec = config.spec or backbone_spec(config.backbone)
    info = machine()
    print_machine(info)
    backbone = Backbone.create(spec, "random", seed=config.seed)
    count = max(config.task_counts)
    packages = [demo_package(backbone, index, task_id=f"task-{index}") for index in range(count)]
    task_ids = [package.task_id for package in packages]
    local = Engine(backbone, TaskRegistry(backbone))
    for package in packages:
        local.registry.add(package)
    cells: list[dict[str, Any]] = []
    overhead = None
    with tempfile.TemporaryDirectory(prefix="e2vpt-bench-tasks-") as scratch:
        task_dir = Path(scratch)
        for package in packages:
            package.save(task_dir / f"{package.task_id}.safetensors")
        for mode in config.modes:
            settings = MODES[mode]
            server = (
                subprocess_server(config, task_dir, settings)
                if config.server == "subprocess"
                else inprocess_server(backbone, task_dir, settings)
            )
            with server as address:
                cells += run_mode(address, config, spec, task_ids, mode)
                if mode == "none":
                    overhead = grpc_overhead(address, config, local, task_ids[0])
    results: dict[str, Any] = {
        "benchmark": "serve",
        "config": config_record(config),
        "backbone": spec.to_dict(),
        "machine": info,
        "modes": {mode: asdict(MODES[mode]) for mode in config.modes},
        "cells": cells,
        "grpc_overhead": overhead,
    }
    results["written"] = publish(build_report(results), results, config.output_dir)
    return results


def build_report(results: dict[str, Any]) -> Report:
    """The tables and plots of a run, from its results alone."""
    config = results["config"]
    cells = Table(
        text=f"Server: {config['server']}; closed-loop async tritonclient clients, one 1-image FP32 `input` "
        f"per request, up to {config['requests_per_cell']} requests or {config['seconds_per_cell']} s per "
        "cell; the client shares the CPU with the server.\n\n"
        "Modes: `mixed` = one batch may hold any tasks (ours); `per-task` = one task per batch (what a "
        "one-model-per-task server can batch); `none` = max batch size 1.",
        rows=[
            {
                "batching": c["mode"],
                "tasks": c["tasks"],
                "popularity": c["popularity"],
                "concurrency": c["concurrency"],
                "req/s": c.get("throughput_rps", 0.0),
                "p50 ms": c.get("p50_ms", "-"),
                "p95 ms": c.get("p95_ms", "-"),
                "p99 ms": c.get("p99_ms", "-"),
                "n": c["completed"],
                "errors": c["errors"],
            }
            for c in results["cells"]
        ],
    )
    sections: list[Table | str] = [cells]
    overhead = results["grpc_overhead"]
    if overhead is not None:
        inside = ", ".join(f"{name} {value:.3g}" for name, value in overhead["server_side_mean_ms"].items())
        row = {
            "in-process forward p50 ms": overhead["in_process_forward_ms"]["median"],
            "round trip p50 ms": overhead["round_trip_ms"]["median"],
            "overhead ms": overhead["overhead_p50_ms"],
            "limit ms": overhead["limit_ms"],
            "status": overhead["status"],
        }
        note = (
            f"Inside the server (mean per request, ms): {inside}. The round trip minus the server's "
            "request time is the transport (client, gRPC, loopback)."
        )
        sections.append(
            Table(title="gRPC overhead at concurrency 1 (no batching, 1 image)", rows=[row], note=note)
        )
    series = ("batching", "tasks", "popularity")
    return Report(
        name="serve",
        title=f"Serving benchmark: {results['backbone']['name']} over gRPC on loopback "
        "(seeded random weights)",
        machine=results["machine"],
        sections=sections,
        panels=[
            Panel(
                cells.rows,
                x="concurrency",
                y=["req/s"],
                series=series,
                xscale="log2",
                dashed=lambda line: not line.startswith("batching mixed"),
            ),
            Panel(
                cells.rows,
                x="concurrency",
                y=["p99 ms"],
                series=series,
                xscale="log2",
                yscale="log",
                dashed=lambda line: not line.startswith("batching mixed"),
                legend=False,
            ),
        ],
    )


def parse_args(argv: Sequence[str] | None = None) -> ServeConfig:
    parser = benchmark_parser("serve", __doc__, "tasks 1 and 8, concurrency 1 and 8, short cells")
    defaults = ServeConfig()
    parser.add_argument(
        "--backbone", help=f"named ViT served by `python -m runtime serve` ({defaults.backbone})"
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help="batching modes (default all)")
    parser.add_argument("--task-counts", type=int, nargs="+", help=f"default {list(defaults.task_counts)}")
    parser.add_argument("--popularity", nargs="+", choices=POPULARITY, help="default both")
    parser.add_argument("--concurrency", type=int, nargs="+", help=f"default {list(defaults.concurrency)}")
    parser.add_argument("--requests-per-cell", type=int, help=f"default {defaults.requests_per_cell}")
    parser.add_argument("--seconds-per-cell", type=float, help=f"default {defaults.seconds_per_cell}")
    parser.add_argument("--server", choices=("subprocess", "inprocess"), help="default subprocess")
    parser.add_argument(
        "--threads", type=int, help="intra-op threads of the server and the in-process engine"
    )
    return parse_config(parser, argv, defaults, QUICK)


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

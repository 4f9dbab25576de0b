"""Scale-out on Ray Serve: the latency Ray's gRPC proxy adds, and throughput of 1 vs 2 replicas.

    python -m benchmarks.scaleout [--quick]

The direct server is ``python -m runtime serve`` in its own process; the Ray application is
``runtime.scaleout.ray_app`` on a local Ray instance, both on the embedded default backbone (ViT-Ti/16,
random weights) with the demo tasks and the same batching settings, queried with tritonclient
(uint8 pixels, one image a request, tasks in turn). Latency: sequential requests (concurrency 1),
p50 of the proxy minus p50 of the direct server alone; the direct server is measured again, taking
turns with the proxy while Ray is up, to split that into the hop and Ray's mere presence.
Throughput: requests answered per second by ``concurrency`` requests kept in flight. Ray runs its
workers at nice 0, as ``serve --cluster ray`` starts it, like the direct server. The report says how
many cores processes outside the benchmark (another job on the machine) used meanwhile: on two
cores, any is felt.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    benchmark_parser,
    config_record,
    free_port,
    machine,
    parse_config,
    summarize,
    target,
    wait_until_ready,
)
from benchmarks.report import Panel, Report, Table, iqr_ms, publish

ADDED_P50_LIMIT_MS = 3.0
# Cores that processes outside the benchmark used during a row's latency and throughput runs.
OTHER_LATENCY, OTHER_THROUGHPUT = "other cores, latency", "other cores, throughput"


@dataclass(frozen=True)
class Config:
    latency_requests: int = 300
    throughput_seconds: float = 15.0
    concurrency: int = 16
    tasks: int = 4
    max_queue_delay_ms: float = 2.0
    seed: int = 0
    output_dir: Path | None = RESULTS_DIR


QUICK = {"latency_requests": 40, "throughput_seconds": 3.0, "output_dir": RESULTS_DIR / "quick"}


def serve_argv(task_dir: Path, port: int, config: Config) -> list[str]:
    return [
        "--backbone", "vit_tiny_patch16_224", "--weights", "random", "--seed", str(config.seed),
        "--task-dir", str(task_dir), "--host", "127.0.0.1", "--port", str(port), "--no-metrics",
        "--http-port", str(free_port()), "--max-queue-delay-ms", str(config.max_queue_delay_ms),
    ]  # fmt: skip


def process_cpu() -> dict[int, tuple[int, float]]:
    """Every process's parent and CPU seconds so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    processes = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue  # not a process
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
        processes[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return processes


class OtherLoad:
    """Cores that processes outside this one's tree (its servers, Ray's) used while the block ran."""

    def __enter__(self) -> OtherLoad:
        self.before, self.started, self.cores = process_cpu(), time.perf_counter(), 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        after = process_cpu()
        ours = {os.getpid()}
        while grown := {pid for pid, (parent, _) in after.items() if parent in ours} - ours:
            ours |= grown
        used = sum(
            cpu - self.before.get(pid, (0, 0.0))[1]
            for pid, (_, cpu) in after.items()
            if pid not in ours and pid > 2  # init and kthreadd: the machine's own
        )
        self.cores = used / (time.perf_counter() - self.started)


def latency(urls: list[str], tasks: list[str], pixels: np.ndarray, count: int) -> list[list[float]]:
    """``count`` sequential requests to each server, taking turns: whatever else runs meanwhile
    weighs on every path alike."""
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(url) for url in urls]
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    try:
        for client in clients:
            for task in tasks:  # warm every path once
                client.infer(task, [tensor])
        samples: list[list[float]] = [[] for _ in clients]
        for index in range(count):
            for client, own in zip(clients, samples, strict=True):
                started = time.perf_counter()
                client.infer(tasks[index % len(tasks)], [tensor])
                own.append(time.perf_counter() - started)
    finally:
        for client in clients:
            client.close()
    return samples


def throughput(url: str, tasks: list[str], pixels: np.ndarray, concurrency: int, seconds: float) -> float:
    from tritonclient.grpc import aio as aioclient

    async def run() -> float:
        async with aioclient.InferenceServerClient(url) as client:
            tensor = aioclient.InferInput("pixels", list(pixels.shape), "UINT8")
            tensor.set_data_from_numpy(pixels)
            done = 0
            stop_at = time.perf_counter() + seconds

            async def worker(offset: int) -> None:
                nonlocal done
                index = offset
                while time.perf_counter() < stop_at:
                    await client.infer(tasks[index % len(tasks)], [tensor])
                    done += 1
                    index += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            return done / (time.perf_counter() - started)

    return asyncio.run(run())


def measure_ray(
    config: Config, task_dir: Path, tasks: list[str], pixels: np.ndarray, direct: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    """The Ray application with 1, then 2 replicas; with 1, the latency of both paths in turns
    (the direct server at ``direct["url"]``, idle otherwise, now with Ray beside it)."""
    import ray
    from ray import serve

    from runtime.scaleout.ray_app import APP_NAME, RAY_SYSTEM_CONFIG, serve_args, start

    port = free_port()
    url = f"127.0.0.1:{port}"
    proxied: dict[int, dict[str, Any]] = {}
    ray.init(
        num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, _system_config=RAY_SYSTEM_CONFIG
    )
    try:
        for replicas in (1, 2):
            start(
                serve_args(
                    [*serve_argv(task_dir, port, config), "--cluster", "ray", "--replicas", str(replicas)]
                )
            )
            record: dict[str, Any] = {}
            if replicas == 1:
                with OtherLoad() as other:
                    direct["beside_latency"], record["latency"] = latency(
                        [direct["url"], url], tasks, pixels, config.latency_requests
                    )
                record["latency_other_cores"] = other.cores
            with OtherLoad() as other:
                record["throughput"] = throughput(
                    url, tasks, pixels, config.concurrency, config.throughput_seconds
                )
            record["other_cores"] = other.cores
            proxied[replicas] = record
            serve.delete(APP_NAME)  # its replicas hold the CPUs the next deployment asks for
    finally:
        serve.shutdown()
        ray.shutdown()
    return proxied


def measure(config: Config) -> dict[str, Any]:
    from runtime.demo import default_backbone, write_demo_tasks

    pixels = np.random.default_rng(config.seed).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as scratch:
        task_dir = Path(scratch)
        tasks = sorted(
            p.name.removesuffix(".safetensors")
            for p in write_demo_tasks(default_backbone(), task_dir, config.tasks)
        )
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "runtime",
            "--log-level",
            "WARNING",
            "serve",
            *serve_argv(task_dir, port, config),
        ]
        direct: dict[str, Any] = {"url": f"127.0.0.1:{port}"}
        with subprocess.Popen(argv, stderr=subprocess.PIPE) as process:
            try:
                wait_until_ready(direct["url"], process, timeout=120)
                with OtherLoad() as other:
                    (direct["latency"],) = latency([direct["url"]], tasks, pixels, config.latency_requests)
                direct["latency_other_cores"] = other.cores
                with OtherLoad() as other:
                    direct["throughput"] = throughput(
                        direct["url"], tasks, pixels, config.concurrency, config.throughput_seconds
                    )
                direct["other_cores"] = other.cores
                proxied = measure_ray(config, task_dir, tasks, pixels, direct)
            finally:
                process.terminate()
    return {"direct": direct, "ray": proxied}


def results_of(config: Config, measured: dict[str, Any]) -> dict[str, Any]:
    direct, ray_one, ray_two = measured["direct"], measured["ray"][1], measured["ray"][2]
    alone, beside, proxied = (
        summarize(direct["latency"]),
        summarize(direct["beside_latency"]),
        summarize(ray_one["latency"]),
    )
    added_ms = (proxied["median"] - alone["median"]) * 1000
    rows = [
        {"path": "direct server", "replicas": 1, "p50 ms": alone["median"] * 1000, "IQR ms": iqr_ms(alone),
         "requests/s": direct["throughput"], OTHER_LATENCY: direct["latency_other_cores"],
         OTHER_THROUGHPUT: direct["other_cores"]},
        {"path": "direct server, Ray idle beside it", "replicas": 1, "p50 ms": beside["median"] * 1000,
         "IQR ms": iqr_ms(beside), "requests/s": "-", OTHER_LATENCY: ray_one["latency_other_cores"],
         OTHER_THROUGHPUT: "-"},
        {"path": "Ray proxy", "replicas": 1, "p50 ms": proxied["median"] * 1000, "IQR ms": iqr_ms(proxied),
         "requests/s": ray_one["throughput"], OTHER_LATENCY: ray_one["latency_other_cores"],
         OTHER_THROUGHPUT: ray_one["other_cores"]},
        {"path": "Ray proxy", "replicas": 2, "p50 ms": "-", "IQR ms": "-",
         "requests/s": ray_two["throughput"], OTHER_LATENCY: "-", OTHER_THROUGHPUT: ray_two["other_cores"]},
    ]  # fmt: skip
    return {
        "benchmark": "scaleout",
        "machine": machine(),
        "config": config_record(config),
        "rows": rows,
        "added_p50_ms": added_ms,
        "hop_p50_ms": (proxied["median"] - beside["median"]) * 1000,
        "scaling_2_over_1": ray_two["throughput"] / ray_one["throughput"],
        "targets": [target("proxy's added p50 latency (ms), concurrency 1", added_ms, ADDED_P50_LIMIT_MS)],
    }


def build_report(results: dict[str, Any]) -> Report:
    config = results["config"]
    return Report(
        name="scaleout",
        title="Scale-out on Ray Serve: proxy latency and replica throughput",
        machine=results["machine"],
        sections=[
            Table(results["targets"], title="Targets"),
            Table(
                results["rows"],
                title="Direct server vs Ray Serve's gRPC proxy",
                text=(
                    f"ViT-Ti/16 (random weights), {config['tasks']} demo tasks, one 224x224 uint8 image a "
                    f"request; latency: {config['latency_requests']} sequential requests (with Ray up, to "
                    "the direct server and the proxy in turns); throughput: "
                    f"{config['concurrency']} requests in flight for {config['throughput_seconds']} s. "
                    "Ray's workers run at nice 0, as the direct server does. Other cores: what processes "
                    "outside the benchmark used meanwhile (on two cores, any is felt)."
                ),
                note=(
                    "Added p50: the proxy's minus the direct server's alone; of it, "
                    f"{results['hop_p50_ms']:.1f} ms is the proxy's against the direct server's with Ray "
                    "beside it (the hop itself), the rest what Ray's idle processes cost a computing "
                    f"server. 2 replicas / 1 replica: {results['scaling_2_over_1']:.2f}x. On this 2-core "
                    "machine both replicas, the proxy, the client and Ray's controller share two cores (one "
                    "compute thread per replica), so little gain is expected; with a replica per free core "
                    "(or per GPU) throughput grows with replicas until the proxy's CPU is the limit."
                ),
            ),
        ],
        panels=[
            Panel(
                [r for r in results["rows"] if r["path"] == "Ray proxy"],
                x="replicas",
                y=["requests/s"],
                ylabel="requests/s",
                ymin=0,
            )
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser("scaleout", __doc__, "fewer requests, shorter throughput runs")
    config = parse_config(parser, argv, Config(), QUICK)
    measured = measure(config)
    results = results_of(config, measured)
    output_dir = (
        config.output_dir
        if config.output_dir != RESULTS_DIR or not config.latency_requests < 300
        else RESULTS_DIR / "quick"
    )
    results["written"] = publish(build_report(results), results, output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

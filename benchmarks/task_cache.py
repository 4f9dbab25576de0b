"""Task cache benchmark: 10,000 registered ViT-B/16 tasks, 500 resident, Zipf(1.1) traffic.

The benchmark writes ``tasks`` seeded random packages (fp32, as ``TaskPackage.from_prompts`` makes
them) into a temporary task directory: 5..20 prompt tokens, 1..10 KV prompts, up to a quarter of the
tokens pruned, shared or separate KV values, 2..100 classes; task 0 has the longest prefix, so the
cached and the all-resident server attend over the same prefix length. Requests name task ``i`` with
Zipf(``zipf_exponent``) probability over all tasks (task 0 the most popular).

* Cache state. A server (``python -m runtime serve``, a subprocess) registers every package
  (model-control mode none) with ``--max-resident-tasks`` resident and ``--host-cache-mb`` of
  evicted tasks kept compiled on the host. A ViT-B forward takes ~0.25 s per image on 2 cores, so
  the cache is driven to its steady state (and its hit rate measured) by *probe* requests: real
  gRPC requests whose input is a 1x1 image. The server makes the task resident and takes its hold
  (the same miss, load and LRU path as any request), then refuses the input before computing.
* A replica of the cache in this process (a ``TaskStore`` over the same directory with the same
  budget) replays the same request sequence in order. It says which tier held each request's task
  (``device``: a hit, ``host`` or ``disk``: a miss), times every miss's load directly (``fetch`` on
  the store's loader, as the server does), and gives the tables' memory at steady state. At
  concurrency 1 its misses equal the server's own ``e2vpt_cache_misses`` (both are reported).
* Requests with compute: at each concurrency level, closed-loop async ``tritonclient`` clients send
  the next stretch of the same Zipf stream (1-image FP32 ``input``), in blocks alternating between
  the cached server and a second server holding every task those requests touch resident (no
  budget). Throughput ratio = cached / all-resident; latency p50/p99 of hits and misses.
* Memory: ``registry.tables.nbytes`` / resident tasks against the mean exact compiled size
  (``entry.nbytes``), and the share of pool rows the resident tasks use.

The servers run with ``OMP_WAIT_POLICY=PASSIVE`` (``--omp-wait-policy``): on a CPU shared with other
work, spinning OpenMP threads made two servers running the same code measure 1.5-2x apart.

The full run takes about 10 minutes and ~7 GiB of process memory on a 2-core CPU; its packages
(8.3 GiB) are written to a temporary directory and read back from the page cache. ``--quick``: a tiny
test ViT, 300 tasks, in-process servers, seconds.
"""

from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing
import os
import random
import statistics
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks.common import (
    RESULTS_DIR,
    backbone_spec,
    benchmark_parser,
    config_record,
    free_port,
    machine,
    paired_ratios,
    parse_config,
    print_machine,
    served_subprocess,
    summarize,
    target,
)
from benchmarks.report import Panel, Report, Table, publish
from benchmarks.serve import popularity_weights, request_input
from runtime.core.backbone import Backbone, BackboneSpec
from runtime.core.package import PACKAGE_SUFFIX, TaskPackage
from runtime.core.prompts import TaskPrompts
from runtime.core.registry import TaskRegistry
from runtime.engines.torch_engine import Engine
from runtime.serving.task_cache import CacheBudget
from runtime.serving.task_store import TaskStore

THROUGHPUT_TARGET = 0.9  # cached server / every touched task resident
MISS_LOAD_TARGET_MS = 20.0
MEMORY_TARGET = 1.10  # table bytes per resident task / its exact compiled size
READY_TIMEOUT_SECONDS = 300.0
MIB = 2**20
HIT, TIERS = "device", ("device", "host", "disk")
SERVER_KINDS = {
    "subprocess": "`python -m runtime serve` in a subprocess",
    "inprocess": "an in-process InferenceServer on its own event-loop thread",
}
# (prompt tokens, KV prompts, pruned tokens, shared KV, classes)
Setting = tuple[int, int, int, bool, int]


@dataclass
class TaskCacheConfig:
    backbone: str = "vit_base_patch16_224"
    tasks: int = 10_000
    max_resident_tasks: int = 500
    host_cache_mb: float = 1024.0
    zipf_exponent: float = 1.1
    prompts: tuple[int, int] = (5, 20)
    kv_prompts: tuple[int, int] = (1, 10)
    classes: tuple[int, int] = (2, 100)
    warmup_requests: int = 3000  # probes that bring the cache to its steady state (not measured)
    steady_requests: int = 3000  # probes measured at steady state: hit rate, miss loads
    concurrency: Sequence[int] = (1, 8)
    requests_per_level: int = 160  # requests with compute per concurrency level (each server)
    blocks: int = 8  # alternating blocks per level: short ones pair up the machine's conditions
    # libgomp's waiting in the subprocess servers (None: the environment's). On a CPU shared with other
    # work, spinning servers lose time slices unevenly: two servers running identical code measured
    # 1.5-2x apart; waiting passively they measure alike.
    omp_wait_policy: str | None = "PASSIVE"
    writers: int = 2  # processes writing packages
    server: str = "subprocess"
    threads: int | None = None
    seed: int = 0
    output_dir: Path | None = RESULTS_DIR
    spec: BackboneSpec | None = field(default=None, repr=False)  # tiny test specs: in-process server only

    def __post_init__(self) -> None:
        if self.server not in ("subprocess", "inprocess"):
            raise ValueError(f"server must be 'subprocess' or 'inprocess', got {self.server!r}")
        if (self.spec is not None or self.backbone == "tiny") and self.server == "subprocess":
            raise ValueError("`python -m runtime serve` serves named ViTs only; use server='inprocess'")
        if self.max_resident_tasks < 1 or self.tasks <= self.max_resident_tasks:
            raise ValueError("need 1 <= max resident tasks < tasks")
        if min(self.concurrency, default=0) < 1 or self.blocks < 1 or self.requests_per_level < self.blocks:
            raise ValueError("concurrency levels and blocks must be positive, with requests for each block")
        if self.writers < 1:
            raise ValueError(f"writers must be at least 1, got {self.writers}")


QUICK: dict[str, Any] = {
    "output_dir": RESULTS_DIR / "quick",
    "backbone": "tiny",
    "server": "inprocess",
    "tasks": 300,
    "max_resident_tasks": 30,
    "host_cache_mb": 0.5,
    "warmup_requests": 300,
    "steady_requests": 300,
    "concurrency": (1, 4),
    "requests_per_level": 40,
    "blocks": 2,
    "writers": 1,
}


def task_id(index: int) -> str:
    return f"task-{index}"


def task_settings(config: TaskCacheConfig) -> list[Setting]:
    """Each task's setting, seeded; task 0 has the longest prefix and the widest head."""
    rng = random.Random(config.seed)
    settings: list[Setting] = [(config.prompts[1], config.kv_prompts[1], 0, False, config.classes[1])]
    for _ in range(1, config.tasks):
        prompts = rng.randint(*config.prompts)
        settings.append(
            (
                prompts,
                rng.randint(*config.kv_prompts),
                rng.randint(0, prompts // 4),
                rng.random() < 0.5,
                rng.randint(*config.classes),
            )
        )
    return settings


def write_package(backbone: Backbone, directory: Path, seed: int, index: int, setting: Setting) -> int:
    """Write task ``index``'s package (no fsync: a scratch directory); returns its file size."""
    prompts, kv, pruned, shared, classes = setting
    spec = backbone.spec
    parameters = TaskPrompts.random(
        spec.depth,
        spec.embed_dim,
        spec.num_heads,
        num_prompts=prompts,
        num_kv=kv,
        num_classes=classes,
        seed=seed + index,
        shared_kv=shared,
        pruned_tokens=pruned,
    )
    data = TaskPackage.from_prompts(task_id(index), parameters, backbone).to_bytes()
    (directory / f"{task_id(index)}{PACKAGE_SUFFIX}").write_bytes(data)
    return len(data)


_writer_backbone: Backbone | None = None


def _start_writer(spec: BackboneSpec, seed: int) -> None:
    global _writer_backbone
    torch.set_num_threads(1)
    _writer_backbone = Backbone.create(spec, "random", seed=seed)


def _write_chunk(directory: Path, seed: int, items: list[tuple[int, Setting]]) -> int:
    assert _writer_backbone is not None
    return sum(write_package(_writer_backbone, directory, seed, index, setting) for index, setting in items)


def write_packages(
    backbone: Backbone, directory: Path, config: TaskCacheConfig, settings: list[Setting]
) -> dict[str, Any]:
    """Every task's package, by ``config.writers`` processes (each builds the same seeded backbone)."""
    started = time.perf_counter()
    items = list(enumerate(settings))
    if config.writers == 1:
        written = sum(
            write_package(backbone, directory, config.seed, index, setting) for index, setting in items
        )
    else:
        chunks = [items[start : start + 200] for start in range(0, len(items), 200)]
        # Spawned, not forked: this process's OpenMP threads do not survive a fork.
        context = multiprocessing.get_context("spawn")
        with context.Pool(config.writers, _start_writer, (backbone.spec, config.seed)) as pool:
            written = sum(pool.starmap(_write_chunk, [(directory, config.seed, chunk) for chunk in chunks]))
    return {"count": len(items), "file_bytes": written, "seconds": time.perf_counter() - started}


@dataclass(frozen=True)
class Streams:
    """The one Zipf request stream, cut into its phases (task ids, in order)."""

    warmup: list[str]
    steady: list[str]
    levels: list[list[str]]  # per concurrency level

    def all(self) -> list[str]:
        return [*self.warmup, *self.steady, *(task for level in self.levels for task in level)]


def make_streams(config: TaskCacheConfig) -> Streams:
    weights = popularity_weights("zipf", config.tasks, config.zipf_exponent)
    cumulative, total = [], 0.0
    for weight in weights:
        total += weight
        cumulative.append(total)
    ids = [task_id(index) for index in range(config.tasks)]
    rng = random.Random(config.seed + 1)

    def draw(count: int) -> list[str]:
        return rng.choices(ids, cum_weights=cumulative, k=count)

    return Streams(
        warmup=draw(config.warmup_requests),
        steady=draw(config.steady_requests),
        levels=[draw(config.requests_per_level) for _ in config.concurrency],
    )


def table_memory(registry: TaskRegistry) -> dict[str, Any]:
    """The tables' allocated bytes against the resident tasks' exact compiled sizes and rows."""
    snapshot = registry.snapshot
    entries = list(snapshot.tasks.values())
    tables = snapshot.tables
    exact = sum(entry.nbytes for entry in entries)
    pools = sum(
        t.numel() * t.element_size()
        for t in (tables.prefix_k, tables.prefix_v, tables.prefix_bias, tables.head_weight, tables.head_bias)
    )
    prefix_used = sum(entry.prefix_len for entry in entries)
    class_used = sum(entry.num_classes for entry in entries)
    return {
        "resident_tasks": len(entries),
        "tables_bytes": tables.nbytes,
        "pool_bytes": pools,
        "page_table_bytes": tables.nbytes - pools,
        "exact_bytes_total": exact,
        "tables_bytes_per_task": tables.nbytes / len(entries),
        "mean_exact_bytes": exact / len(entries),
        "ratio": tables.nbytes / exact,
        "slots": tables.slots,
        "prefix_width": tables.prefix,
        "class_width": tables.classes,
        "prefix_rows": tables.prefix_rows,
        "prefix_rows_used": prefix_used,
        "class_rows": tables.class_rows,
        "class_rows_used": class_used,
        "prefix_rows_used_share": prefix_used / tables.prefix_rows,
        "class_rows_used_share": class_used / tables.class_rows,
        "mean_prefix_len": prefix_used / len(entries),
    }


def replay(backbone: Backbone, task_dir: Path, config: TaskCacheConfig, streams: Streams) -> dict[str, Any]:
    """The cache's replica: each request's tier, each miss's load time, the tables at steady state."""
    budget = CacheBudget(
        max_resident_tasks=config.max_resident_tasks, max_host_bytes=int(config.host_cache_mb * MIB)
    )
    registry = TaskRegistry(backbone)
    store = TaskStore(task_dir, registry, "none", budget=budget)
    store.start()
    tiers: list[str] = []
    load_seconds: list[float | None] = []
    reallocated: list[int] = []  # requests whose load reallocated the tables (copying every task)
    steady_end = len(streams.warmup) + len(streams.steady)
    memory: dict[str, Any] = {}
    try:
        for index, task in enumerate(streams.all()):
            if index == steady_end:
                memory = table_memory(registry)
            tier = store.cache.tier(task)
            seconds = None
            if tier != HIT:
                allocation = registry.tables.allocation
                begin = time.perf_counter()
                store.fetch(task).result()
                seconds = time.perf_counter() - begin
                if registry.tables.allocation != allocation:
                    reallocated.append(index)
            registry.release(store.cache.hold(task))  # what a request does: the LRU touch
            tiers.append(tier)
            load_seconds.append(seconds)
    finally:
        store.stop()
    return {"tiers": tiers, "load_seconds": load_seconds, "reallocated": reallocated, "memory": memory}


def hit_rate_curve(tiers: Sequence[str], windows: int = 40) -> list[dict[str, Any]]:
    size = max(len(tiers) // windows, 1)
    return [
        {"requests": start + size, "hit rate": tiers[start : start + size].count(HIT) / size}
        for start in range(0, len(tiers) - size + 1, size)
    ]


class Served(NamedTuple):
    address: str
    metrics_port: int


@contextmanager
def subprocess_server(config: TaskCacheConfig, task_dir: Path, bounded: bool) -> Iterator[Served]:
    """``python -m runtime serve`` (mode none) on free loopback ports, once it is ready."""
    port, metrics_port = free_port(), free_port()
    arguments = [
        "--backbone", config.backbone, "--weights", "random", "--seed", str(config.seed), "--device", "cpu",
        "--task-dir", str(task_dir), "--model-control-mode", "none",
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port), "--no-http",
        "--max-queue-size", "1024",
    ]  # fmt: skip
    if bounded:
        arguments += ["--max-resident-tasks", str(config.max_resident_tasks)]
        arguments += ["--host-cache-mb", str(config.host_cache_mb)]
    if config.threads:
        arguments += ["--threads", str(config.threads)]
    env = {"OMP_WAIT_POLICY": config.omp_wait_policy} if config.omp_wait_policy else None
    with served_subprocess(arguments, port, READY_TIMEOUT_SECONDS, env=env) as address:
        yield Served(address, metrics_port)


@contextmanager
def inprocess_server(
    backbone: Backbone, config: TaskCacheConfig, task_dir: Path, bounded: bool
) -> Iterator[Served]:
    """The same server on its own event-loop thread in this process (tiny test models)."""
    from runtime.serving.server import BackgroundServer, InferenceServer, ServerConfig

    settings = ServerConfig(
        host="127.0.0.1",
        port=0,
        task_dir=task_dir,
        model_control_mode="none",
        max_resident_tasks=config.max_resident_tasks if bounded else None,
        host_cache_mb=config.host_cache_mb,
        max_queue_size=1024,
        threads=config.threads,
        metrics_port=0,
        metrics_host="127.0.0.1",
        grace_seconds=5.0,
    )
    with BackgroundServer(InferenceServer(Engine(backbone, TaskRegistry(backbone)), settings)) as server:
        assert server.port is not None and server.metrics_port is not None
        yield Served(f"127.0.0.1:{server.port}", server.metrics_port)


SCRAPED = ("e2vpt_cache", "e2vpt_load_wait_seconds", "e2vpt_batch_rows")


def scrape(port: int) -> dict[str, float]:
    """The server's cache and batch counters, summed over tasks (``name[source]`` per source or tier)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(SCRAPED):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            part = sample.labels.get("source") or sample.labels.get("tier")
            totals[f"{sample.name}[{part}]" if part else sample.name] += sample.value
    return dict(totals)


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: value - before.get(name, 0.0) for name, value in after.items() if "cache_tasks" not in name}


def probe_input() -> Any:
    """A 1x1 image: the server loads and holds the task, then refuses the input before computing."""
    import numpy as np
    from tritonclient.grpc import aio as aioclient

    tensor = aioclient.InferInput("input", [1, 3, 1, 1], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 1, 1), dtype=np.float32))
    return tensor


@dataclass
class Outcome:
    latencies: list[float]
    errors: list[str | None]  # per request: its gRPC status when it failed
    elapsed: float


async def drive(client: Any, tensor: Any, tasks: Sequence[str], concurrency: int) -> Outcome:
    """Closed loop: ``concurrency`` clients take the next request of ``tasks`` when their last returns."""
    from tritonclient.utils import InferenceServerException

    latencies = [0.0] * len(tasks)
    errors: list[str | None] = [None] * len(tasks)
    cursor = iter(range(len(tasks)))  # shared: the stream's order is the order of sending

    async def worker() -> None:
        for index in cursor:
            begin = time.perf_counter()
            try:
                await client.infer(tasks[index], [tensor])
            except InferenceServerException as error:
                errors[index] = str(error.status() or error)
            latencies[index] = time.perf_counter() - begin

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Outcome(latencies, errors, time.perf_counter() - started)


def probe_stream(served: Served, streams: Streams) -> dict[str, Any]:
    """Warm-up then steady probes at concurrency 1, with the server's counters around the steady part."""
    from tritonclient.grpc import aio as aioclient

    async def go() -> tuple[Outcome, Outcome, dict[str, float], dict[str, float]]:
        tensor = probe_input()
        async with aioclient.InferenceServerClient(served.address) as client:
            warm = await drive(client, tensor, streams.warmup, 1)
            before = scrape(served.metrics_port)
            steady = await drive(client, tensor, streams.steady, 1)
            after = scrape(served.metrics_port)
        return warm, steady, before, after

    warm, steady, before, after = asyncio.run(go())
    refused = "StatusCode.INVALID_ARGUMENT"
    unexpected = [e for e in warm.errors + steady.errors if e != refused]
    return {
        "warmup_seconds": warm.elapsed,
        "steady_seconds": steady.elapsed,
        "steady_latencies": steady.latencies,
        "unexpected_statuses": unexpected[:5],
        "unexpected_count": len(unexpected),
        "server_counters": counter_deltas(before, after),
        "server_tiers_after": {k: v for k, v in after.items() if "cache_tasks" in k},
    }


def compute_levels(
    cached: Served, resident: Served, spec: BackboneSpec, config: TaskCacheConfig, streams: Streams
) -> list[dict[str, Any]]:
    """Per concurrency level: its stretch of the stream in blocks alternating between the servers."""
    from tritonclient.grpc import aio as aioclient

    tensor = request_input(spec, config.seed)
    levels = []

    async def level(concurrency: int, tasks: list[str]) -> dict[str, Any]:
        size = math.ceil(len(tasks) / config.blocks)
        blocks = [tasks[start : start + size] for start in range(0, len(tasks), size)]
        runs: dict[str, list[Outcome]] = {"cached": [], "resident": []}
        servers = {"cached": cached, "resident": resident}
        async with (
            aioclient.InferenceServerClient(cached.address) as cached_client,
            aioclient.InferenceServerClient(resident.address) as resident_client,
        ):
            clients = {"cached": cached_client, "resident": resident_client}
            for client in clients.values():  # task 0 is resident in both: warms the compute path only
                await drive(client, tensor, [task_id(0)] * 2 * concurrency, concurrency)
            before = {variant: scrape(served.metrics_port) for variant, served in servers.items()}
            for number, block in enumerate(blocks):
                order = ("cached", "resident") if number % 2 == 0 else ("resident", "cached")
                for variant in order:
                    runs[variant].append(await drive(clients[variant], tensor, block, concurrency))
            after = {variant: scrape(served.metrics_port) for variant, served in servers.items()}
        return {
            "concurrency": concurrency,
            "requests": len(tasks),
            "server_counters": {
                variant: counter_deltas(before[variant], after[variant]) for variant in servers
            },
            **{
                variant: {
                    "block_seconds": [run.elapsed for run in outcomes],
                    "latencies": [latency for run in outcomes for latency in run.latencies],
                    "errors": [error for run in outcomes for error in run.errors if error is not None],
                }
                for variant, outcomes in runs.items()
            },
        }

    for concurrency, tasks in zip(config.concurrency, streams.levels, strict=True):
        result = asyncio.run(level(concurrency, tasks))
        levels.append(result)
        cached_rps = len(tasks) / sum(result["cached"]["block_seconds"])
        resident_rps = len(tasks) / sum(result["resident"]["block_seconds"])
        print(
            f"concurrency {concurrency}: cached {cached_rps:.2f} req/s, all resident {resident_rps:.2f} "
            f"req/s ({cached_rps / resident_rps:.3f}x); errors {len(result['cached']['errors'])} / "
            f"{len(result['resident']['errors'])}"
        )
    return levels


def run(config: TaskCacheConfig) -> dict[str, Any]:
    """Run the benchmark; writes results under ``config.output_dir`` (unless None) and returns them."""
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    spec = config.spec or backbone_spec(config.backbone)
    info = machine()
    print_machine(info)
    backbone = Backbone.create(spec, "random", seed=config.seed)
    settings = task_settings(config)
    streams = make_streams(config)
    touched = sorted(set(task for level in streams.levels for task in level))
    with tempfile.TemporaryDirectory(prefix="e2vpt-bench-cache-") as scratch:
        every, some = Path(scratch) / "all", Path(scratch) / "touched"
        every.mkdir()
        some.mkdir()
        packages = write_packages(backbone, every, config, settings)
        print(f"wrote {packages['count']} packages ({packages['file_bytes'] / MIB:.0f} MiB) "
              f"in {packages['seconds']:.1f} s")  # fmt: skip
        for task in touched:  # hard links: a package must be a file inside its task directory
            name = f"{task}{PACKAGE_SUFFIX}"
            os.link(every / name, some / name)
        begin = time.perf_counter()
        replica = replay(backbone, every, config, streams)
        replica["seconds"] = time.perf_counter() - begin
        gc.collect()  # the replica's tables and host copies
        print(f"replica replayed {len(replica['tiers'])} requests in {replica['seconds']:.1f} s")
        if config.server == "subprocess":
            cached_server = subprocess_server(config, every, bounded=True)
            resident_server = subprocess_server(config, some, bounded=False)
        else:
            cached_server = inprocess_server(backbone, config, every, bounded=True)
            resident_server = inprocess_server(backbone, config, some, bounded=False)
        with cached_server as cached:
            begin = time.perf_counter()
            probes = probe_stream(cached, streams)
            probes["seconds"] = time.perf_counter() - begin
            print(f"probes: {len(streams.warmup) + len(streams.steady)} in {probes['seconds']:.1f} s")
            with resident_server as resident:
                levels = compute_levels(cached, resident, spec, config, streams)
    results: dict[str, Any] = {
        "benchmark": "task_cache",
        "config": config_record(config),
        "backbone": spec.to_dict(),
        "machine": info,
        "packages": {**packages, "touched_by_compute": len(touched)},
        "replica": replica,
        "probes": probes,
        "levels": levels,
    }
    results["summary"] = summarize_run(results)
    results["targets"] = targets(results)
    results["wall_seconds"] = time.perf_counter() - started
    results["written"] = publish(build_report(results), results, config.output_dir)
    return results


def _ms(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    return {k: v * 1e3 if k != "n" else v for k, v in summarize(samples).items()}


def summarize_run(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the report and the targets read, from the raw results."""
    config = results["config"]
    tiers, loads = results["replica"]["tiers"], results["replica"]["load_seconds"]
    warm, steady = config["warmup_requests"], config["steady_requests"]
    steady_tiers = tiers[warm : warm + steady]
    measured = range(warm, len(tiers))  # steady probes and requests with compute
    miss_loads = {
        tier: [loads[i] for i in measured if tiers[i] == tier and loads[i] is not None] for tier in TIERS[1:]
    }
    probes = list(zip(results["probes"]["steady_latencies"], steady_tiers, strict=True))
    hit_probes = [latency for latency, tier in probes if tier == HIT]
    hit_median = statistics.median(hit_probes) if hit_probes else 0.0
    probe_waits = {tier: [latency - hit_median for latency, t in probes if t == tier] for tier in TIERS[1:]}
    counters = results["probes"]["server_counters"]
    levels = []
    start = warm + steady
    for level in results["levels"]:
        level_tiers = tiers[start : start + level["requests"]]
        start += level["requests"]
        cached_seconds, resident_seconds = (
            level["cached"]["block_seconds"],
            level["resident"]["block_seconds"],
        )
        classes: dict[str, dict[str, Any]] = {}
        for variant in ("cached", "resident"):
            latencies = level[variant]["latencies"]
            classes[f"{variant}, all"] = _ms(latencies)
            classes[f"{variant}, hits"] = _ms(
                [x for x, t in zip(latencies, level_tiers, strict=True) if t == HIT]
            )
            classes[f"{variant}, misses"] = _ms(
                [x for x, t in zip(latencies, level_tiers, strict=True) if t != HIT]
            )
        levels.append(
            {
                "concurrency": level["concurrency"],
                "requests": level["requests"],
                "replica_hit_rate": level_tiers.count(HIT) / len(level_tiers),
                "replica_misses": len(level_tiers) - level_tiers.count(HIT),
                "server_misses": level["server_counters"]["cached"].get("e2vpt_cache_misses_total", 0.0),
                "rows_per_batch": {
                    variant: deltas.get("e2vpt_batch_rows_sum", 0.0)
                    / max(deltas.get("e2vpt_batch_rows_count", 0.0), 1)
                    for variant, deltas in level["server_counters"].items()
                },
                "cached_rps": level["requests"] / sum(cached_seconds),
                "resident_rps": level["requests"] / sum(resident_seconds),
                # Per block: both servers ran it back to back, so bursts of other load cancel out.
                "throughput_ratio": paired_ratios(resident_seconds, cached_seconds),
                "throughput_ratio_overall": sum(resident_seconds) / sum(cached_seconds),
                "latency_ms": classes,
                "errors": len(level["cached"]["errors"]) + len(level["resident"]["errors"]),
            }
        )
    all_misses = [seconds for samples in miss_loads.values() for seconds in samples]
    reallocations = [index for index in results["replica"]["reallocated"] if index >= warm]

    def server_mean_ms(name: str, source: str = "") -> float | None:
        """A server histogram's exact mean (sum / count) over the steady probes."""
        part = f"[{source}]" if source else ""
        count = counters.get(f"{name}_count{part}", 0.0)
        return counters.get(f"{name}_sum{part}", 0.0) / count * 1e3 if count else None

    return {
        "steady_hit_rate": steady_tiers.count(HIT) / len(steady_tiers),
        "steady_misses_replica": len(steady_tiers) - steady_tiers.count(HIT),
        "steady_misses_server": counters.get("e2vpt_cache_misses_total", 0.0),
        "steady_miss_sources": {tier: steady_tiers.count(tier) for tier in TIERS},
        "miss_load_ms": _ms(all_misses),
        "reallocations_measured": len(reallocations),
        "reallocations_warmup": len(results["replica"]["reallocated"]) - len(reallocations),
        "miss_load_ms_by_source": {tier: _ms(samples) for tier, samples in miss_loads.items()},
        "probe_hit_ms": _ms(hit_probes),
        "probe_miss_wait_ms": {tier: _ms(samples) for tier, samples in probe_waits.items()},
        "server_load_mean_ms": {tier: server_mean_ms("e2vpt_cache_load_seconds", tier) for tier in TIERS[1:]},
        "server_load_wait_mean_ms": server_mean_ms("e2vpt_load_wait_seconds"),
        "levels": levels,
        "memory": results["replica"]["memory"],
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    summary = results["summary"]
    rows = [
        target(
            "throughput: cached / every touched task resident",
            level["throughput_ratio"]["median"],
            THROUGHPUT_TARGET,
            smaller_is_better=False,
            concurrency=level["concurrency"],
        )
        for level in summary["levels"]
    ]
    rows.append(target("miss load latency p50 (ms)", summary["miss_load_ms"]["median"], MISS_LOAD_TARGET_MS))
    rows.append(
        target(
            "table bytes per resident task / exact compiled size",
            summary["memory"]["ratio"],
            MEMORY_TARGET,
        )
    )
    return rows


def build_report(results: dict[str, Any]) -> Report:
    """The tables and plots of a run, from its results alone."""
    config, summary, memory = results["config"], results["summary"], results["summary"]["memory"]
    packages = results["packages"]
    sources = summary["steady_miss_sources"]
    misses = sources["host"] + sources["disk"]
    waiting = (
        f", OMP_WAIT_POLICY={config['omp_wait_policy']} (identical servers spinning measured 1.5-2x apart "
        "on this shared CPU)"
        if config["server"] == "subprocess" and config["omp_wait_policy"]
        else ""
    )
    setup = (
        f"{packages['count']:,} registered tasks ({packages['file_bytes'] / MIB:,.0f} MiB of fp32 packages: "
        f"{config['prompts'][0]}-{config['prompts'][1]} prompt tokens, {config['kv_prompts'][0]}-"
        f"{config['kv_prompts'][1]} KV prompts, up to a quarter pruned, {config['classes'][0]}-"
        f"{config['classes'][1]} classes), at most {config['max_resident_tasks']} resident, "
        f"{config['host_cache_mb']:g} MiB of evicted tasks kept compiled on the host; requests draw tasks "
        f"from Zipf({config['zipf_exponent']}) over all of them. Server: {SERVER_KINDS[config['server']]}, "
        f"model-control mode none{waiting}, gRPC on loopback (the client shares the CPU). "
        f"The cache reached its steady state through {config['warmup_requests']:,} probe requests "
        f"(real requests with a 1x1 input: the server loads and holds the task, then refuses the input "
        f"before computing), then {config['steady_requests']:,} more were measured. A replica of the "
        "cache in the benchmark's process (same budget, same sequence) says which tier held each "
        "request's task and times each miss's load directly; tables memory is the replica's."
    )
    steady = Table(
        title="Steady state (probe requests, concurrency 1)",
        rows=[
            {
                "requests": config["steady_requests"],
                "hit rate": summary["steady_hit_rate"],
                "misses (replica)": summary["steady_misses_replica"],
                "misses (server counter)": summary["steady_misses_server"],
                "from host": sources["host"],
                "from disk": sources["disk"],
                "probe hit p50 ms": summary["probe_hit_ms"].get("median", math.nan),
            }
        ],
        note=f"Misses from the host tier: {sources['host'] / max(misses, 1):.0%}. A probe's round trip "
        "is the gRPC call, the hold and the refusal; a miss adds its load.",
    )
    load_rows = []
    for source in (*TIERS[1:], "all"):
        direct = summary["miss_load_ms"] if source == "all" else summary["miss_load_ms_by_source"][source]
        row: dict[str, Any] = {
            "source": source,
            "n": direct["n"],
            "p50": direct.get("median", math.nan),
            "p95": direct.get("p95", math.nan),
            "p99": direct.get("p99", math.nan),
            "max": direct.get("max", math.nan),
        }
        if source != "all":
            mean = summary["server_load_mean_ms"][source]
            row["server mean"] = math.nan if mean is None else mean
            row["probe wait p50"] = summary["probe_miss_wait_ms"][source].get("median", math.nan)
        load_rows.append(row)
    loads = Table(
        title="Miss loads (ms)",
        rows=load_rows,
        columns=("source", "n", "p50", "p95", "p99", "max", "server mean", "probe wait p50"),
        text="Direct: the replica's `store.fetch(task)` until resident (read, check and compile the "
        "package, or copy the host copy back; evict; write the tables), over the steady probes and "
        "the requests with compute. Server mean: `e2vpt_cache_load_seconds` sum / count over the "
        "steady probes. Probe wait: a missing probe's round trip minus the hit probes' median.",
        note=f"Loads that reallocated the tables (bigger pools or more slots: a copy of every resident "
        f"task): {summary['reallocations_measured']} of the measured misses, "
        f"{summary['reallocations_warmup']} during the warm-up.",
    )
    throughput_rows, latency_rows = [], []
    for level in summary["levels"]:
        ratio = level["throughput_ratio"]
        throughput_rows.append(
            {
                "concurrency": level["concurrency"],
                "requests": level["requests"],
                "hit rate": level["replica_hit_rate"],
                "misses (replica / server)": f"{level['replica_misses']} / {level['server_misses']:.0f}",
                "rows per batch (cached / resident)": f"{level['rows_per_batch']['cached']:.2f} / "
                f"{level['rows_per_batch']['resident']:.2f}",
                "cached req/s": level["cached_rps"],
                "all resident req/s": level["resident_rps"],
                "ratio (per-block p50)": ratio["median"],
                "IQR": f"{ratio['p25']:.3f}-{ratio['p75']:.3f}",
                "ratio over all blocks": level["throughput_ratio_overall"],
                "errors": level["errors"],
            }
        )
        for name, stats in level["latency_ms"].items():
            latency_rows.append(
                {
                    "concurrency": level["concurrency"],
                    "server, requests": name,
                    "n": stats["n"],
                    "p50 ms": stats.get("median", math.nan),
                    "p99 ms": stats.get("p99", math.nan),
                }
            )
    throughput = Table(
        title="Throughput with compute: cached server vs every touched task resident",
        rows=throughput_rows,
        text=f"Each level sends the next {config['requests_per_level']} requests of the stream (1-image "
        f"FP32 `input`, closed loop) to both servers in {config['blocks']} blocks, alternating which goes "
        f"first; the all-resident server holds the {packages['touched_by_compute']} tasks these requests "
        "touch, with no budget. Ratio = cached req/s / all-resident req/s: the median over blocks (the "
        "target's; each block ran on both servers back to back) and over all blocks. Hit rate and "
        "replica misses: the replica's tiers for the same sequence (exact at concurrency 1; at higher "
        "concurrency requests may reach the server in another order). Rows per batch: the servers' "
        "`e2vpt_batch_rows` over the level; a request waiting for its task's load misses the batch that "
        "leaves meanwhile.",
    )
    latency = Table(
        title="Latency of requests with compute (client side)",
        rows=latency_rows,
        note="Hits and misses are the replica's; the all-resident rows split the same requests the same "
        "way, so a class's difference between the servers is what the cache costs it.",
    )
    memory_table = Table(
        title=f"Tables memory at steady state ({memory['resident_tasks']} resident tasks)",
        rows=[
            {
                "tables MiB": memory["tables_bytes"] / MIB,
                "per resident task KiB": memory["tables_bytes_per_task"] / 1024,
                "exact compiled KiB (mean)": memory["mean_exact_bytes"] / 1024,
                "ratio": memory["ratio"],
                "prefix rows used": f"{memory['prefix_rows_used']:,} / {memory['prefix_rows']:,} "
                f"({memory['prefix_rows_used_share']:.1%})",
                "class rows used": f"{memory['class_rows_used']:,} / {memory['class_rows']:,} "
                f"({memory['class_rows_used_share']:.1%})",
                "slots": memory["slots"],
                "page tables KiB": memory["page_table_bytes"] / 1024,
            }
        ],
        note=f"Mean prefix {memory['mean_prefix_len']:.1f} rows. The pools grow by at least a quarter "
        "when full (a row keeps its index), so up to a fifth of their rows can be free.",
    )
    goals = Table(
        title="Targets",
        rows=results["targets"],
        columns=("target", "concurrency", "value", "limit", "status"),
    )
    minutes = results["wall_seconds"] / 60
    timing = (
        f"Run: {minutes:.1f} min (packages written in {packages['seconds']:.0f} s, replica "
        f"{results['replica']['seconds']:.0f} s, probes {results['probes']['seconds']:.0f} s)."
    )
    return Report(
        name="task_cache",
        title=f"Task cache benchmark: {packages['count']:,} {results['backbone']['name']} tasks, "
        f"{config['max_resident_tasks']} resident, Zipf({config['zipf_exponent']}) (seeded random weights)",
        machine=results["machine"],
        sections=[setup, steady, loads, throughput, latency, memory_table, goals, timing],
        panels=[
            Panel(
                hit_rate_curve(results["replica"]["tiers"]),
                x="requests",
                y=["hit rate"],
                ylabel="hit rate per window (replica; probes, then requests with compute)",
                ymin=0,
                legend=False,
            ),
            Panel(
                throughput_rows,
                x="concurrency",
                y=["cached req/s", "all resident req/s"],
                xscale="log2",
                ylabel="requests/s",
                ymin=0,
            ),
            Panel(
                latency_rows,
                x="concurrency",
                y=["p50 ms"],
                series=("server, requests",),
                xscale="log2",
                yscale="log",
                dashed=lambda line: line.startswith("resident"),
            ),
        ],
    )


def parse_args(argv: Sequence[str] | None = None) -> TaskCacheConfig:
    parser = benchmark_parser("task_cache", __doc__, "tiny ViT, 300 tasks, 30 resident, in-process servers")
    defaults = TaskCacheConfig()
    parser.add_argument(
        "--backbone", help=f"named ViT or 'tiny' (in-process only; default {defaults.backbone})"
    )
    parser.add_argument("--tasks", type=int, help=f"registered tasks ({defaults.tasks})")
    parser.add_argument(
        "--max-resident-tasks", type=int, help=f"resident budget ({defaults.max_resident_tasks})"
    )
    parser.add_argument("--host-cache-mb", type=float, help=f"host tier in MiB ({defaults.host_cache_mb:g})")
    parser.add_argument("--zipf-exponent", type=float, help=f"popularity exponent ({defaults.zipf_exponent})")
    parser.add_argument("--warmup-requests", type=int, help=f"unmeasured probes ({defaults.warmup_requests})")
    parser.add_argument("--steady-requests", type=int, help=f"measured probes ({defaults.steady_requests})")
    parser.add_argument("--concurrency", type=int, nargs="+", help=f"default {list(defaults.concurrency)}")
    parser.add_argument(
        "--requests-per-level",
        type=int,
        help=f"requests with compute per level ({defaults.requests_per_level})",
    )
    parser.add_argument("--blocks", type=int, help=f"alternating blocks per level ({defaults.blocks})")
    parser.add_argument("--writers", type=int, help=f"processes writing packages ({defaults.writers})")
    parser.add_argument("--server", choices=("subprocess", "inprocess"), help="default subprocess")
    parser.add_argument("--threads", type=int, help="intra-op threads of the servers")
    parser.add_argument(
        "--omp-wait-policy",
        choices=("PASSIVE", "ACTIVE"),
        help=f"OMP_WAIT_POLICY of the subprocess servers (default {defaults.omp_wait_policy})",
    )
    return parse_config(parser, argv, defaults, QUICK)


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

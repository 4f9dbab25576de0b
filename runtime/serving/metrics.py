"""Server counters: Prometheus metrics (own registry per server) and per-task ModelStatistics.

Statistics follow Triton's accounting: every request of a batch is charged the batch's whole
compute time (compute_input/infer/output count requests, their ns add the batch's time once per
request), ``batch_stats`` is keyed by the task's own rows in the batch, and ``execution_count``
counts the batches a task took part in. The Prometheus registry carries Triton's metric names and
labels (``nv_*``, per ``model`` and ``version``) beside this server's own ``e2vpt_*``.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, UnknownMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
METRICS_PATH = "/metrics"
MODEL_LABELS = ("model", "version")


# Triton's cumulative per-model counters: name after ``nv_inference_``, help text.
TRITON_COUNTERS = {
    "request_success": "Number of successful inference requests, all batch sizes",
    "request_failure": "Number of failed inference requests, all batch sizes",
    "count": "Number of inferences performed (does not include cached requests)",
    "exec_count": "Number of model executions performed (does not include cached requests)",
    "request_duration_us": "Cumulative inference request duration in microseconds",
    "queue_duration_us": "Cumulative inference queuing duration in microseconds",
    "compute_input_duration_us": "Cumulative compute input duration in microseconds",
    "compute_infer_duration_us": "Cumulative compute inference duration in microseconds",
    "compute_output_duration_us": "Cumulative inference compute output duration in microseconds",
}


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchDurations:
    """Per batch size: how long its batches took in each phase (``ModelStatistics.batch_stats``)."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(frozen=True)
class BatchShare:
    """One task version's part of an executed batch: its rows and each of its requests' queue time."""

    task_id: str
    version: str
    rows: int
    queue_ns: Sequence[int]


@dataclass
class TaskStats:
    """Triton-style cumulative statistics of one task (all versions)."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchDurations] = field(default_factory=lambda: defaultdict(BatchDurations))


class ServerMetrics:
    """All counters of one server. Thread-safe: the batcher thread and the event loop both record."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._tasks: dict[str, TaskStats] = defaultdict(TaskStats)
        self._http: WSGIServer | None = None
        r = self.registry
        self.requests = Counter(
            "e2vpt_requests", "Inference requests by task and outcome", ["task", "outcome"], registry=r
        )
        self.failures = Counter(
            "e2vpt_request_failures", "Failed inference requests by gRPC status code", ["code"], registry=r
        )
        self.images = Counter("e2vpt_images", "Images (rows) inferred, by task", ["task"], registry=r)
        self.request_seconds = Histogram(
            "e2vpt_request_seconds", "End-to-end ModelInfer latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "e2vpt_queue_seconds",
            "Time a request waited in the batch queue",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "e2vpt_compute_seconds", "Forward time of one batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram("e2vpt_batch_rows", "Images per batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tasks = Histogram(
            "e2vpt_batch_tasks", "Distinct tasks per batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.dropped = Counter(
            "e2vpt_dropped_requests",
            "Requests dropped before decoding or compute: deadline passed or caller cancelled",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge("e2vpt_queue_depth", "Requests waiting in the batch queue", registry=r)
        self.inflight = Gauge(
            "e2vpt_inflight_requests",
            "Admitted requests not yet answered (decoding, queued, computing)",
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "e2vpt_preprocess_seconds",
            "Time to validate and decode one request's input",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tasks_loaded = Gauge("e2vpt_tasks_loaded", "Tasks currently loaded", registry=r)
        self.task_loads = Counter(
            "e2vpt_task_loads", "Task load attempts by outcome", ["outcome"], registry=r
        )
        self.load_seconds = Histogram(
            "e2vpt_task_load_seconds",
            "Time to read, check and compile a task",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # The task cache (runtime/serving/task_cache.py): tiers, misses, loads and evictions per task.
        self.tasks_registered = Gauge(
            "e2vpt_tasks_registered", "Tasks servable: resident, or loadable on demand", registry=r
        )
        self.cache_tasks = Gauge(
            "e2vpt_cache_tasks",
            "Tasks held per tier (device: resident in the tables; host: compiled)",
            ["tier"],
            registry=r,
        )
        self.cache_misses = Counter(
            "e2vpt_cache_misses",
            "Requests that found their task not resident and started its load",
            registry=r,
        )
        self.cache_loads = Counter(
            "e2vpt_cache_loads",
            "Tasks made resident, by task and where from (host, disk)",
            ["task", "source"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "e2vpt_cache_evictions", "Tasks evicted from the tables, by task", ["task"], registry=r
        )
        self.cache_over_budget = Counter(
            "e2vpt_cache_over_budget",
            "Loads that went over the resident budget: every resident task was pinned or in use",
            registry=r,
        )
        self.cache_load_seconds = Histogram(
            "e2vpt_cache_load_seconds",
            "Time to make a task resident, by source (host, disk)",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.load_wait_seconds = Histogram(
            "e2vpt_load_wait_seconds",
            "Time a request waited for its task to become resident",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Triton's names and labels, so its dashboards and perf_analyzer --collect-metrics read them.
        self.triton = TritonCounters()
        r.register(self.triton)
        self.nv_pending = Gauge(
            "nv_inference_pending_request_count",
            "Instantaneous number of pending requests awaiting execution per-model",
            MODEL_LABELS,
            registry=r,
        )
        r.register(HostCollector())

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Expose ``/metrics`` (only: 404 elsewhere) on ``addr:port`` (0 picks a free one); the bound port."""
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != METRICS_PATH:
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"not found: metrics are served at /metrics\n"]
            return metrics(environ, start_response)

        http = make_server(addr, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        threading.Thread(target=http.serve_forever, name="e2vpt-metrics", daemon=True).start()
        self._http = http
        return http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def record_success(self, task_id: str, version: str, seconds: float) -> None:
        self.requests.labels(task_id, "success").inc()
        self.request_seconds.observe(seconds)
        self.triton.add((task_id, version), request_success=1, request_duration_us=seconds * 1e6)
        with self._lock:
            stats = self._tasks[task_id]
            stats.success.add(int(seconds * 1e9))
            stats.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, task_id: str, version: str | None, code: str, seconds: float) -> None:
        """A failed request; ``version`` None for a task that is not loaded (no Triton series)."""
        self.requests.labels(task_id, "failure").inc()
        self.failures.labels(code).inc()
        if version is not None:
            self.triton.add((task_id, version), request_failure=1, request_duration_us=seconds * 1e6)
        with self._lock:
            self._tasks[task_id].fail.add(int(seconds * 1e9))

    def record_batch(
        self, shares: Sequence[BatchShare], input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One executed batch: its size and phases, charged in full to every request in it (Triton's way)."""
        self.batch_rows.observe(sum(share.rows for share in shares))
        self.batch_tasks.observe(len({share.task_id for share in shares}))
        self.compute_seconds.observe((input_ns + infer_ns + output_ns) / 1e9)
        for share in shares:
            for wait in share.queue_ns:
                self.queue_seconds.observe(wait / 1e9)
            requests = len(share.queue_ns)
            self.images.labels(share.task_id).inc(share.rows)
            self.triton.add(
                (share.task_id, share.version),
                count=share.rows,
                exec_count=1,
                queue_duration_us=sum(share.queue_ns) / 1e3,
                compute_input_duration_us=requests * input_ns / 1e3,
                compute_infer_duration_us=requests * infer_ns / 1e3,
                compute_output_duration_us=requests * output_ns / 1e3,
            )
        with self._lock:
            # Two versions of one task in a batch (a replacement mid-queue) are one execution of it.
            rows_by_task: dict[str, int] = defaultdict(int)
            for share in shares:
                stats = self._tasks[share.task_id]
                requests = len(share.queue_ns)
                rows_by_task[share.task_id] += share.rows
                stats.inference_count += share.rows
                for wait in share.queue_ns:
                    stats.queue.add(wait)
                stats.compute_input.add(requests * input_ns, requests)
                stats.compute_infer.add(requests * infer_ns, requests)
                stats.compute_output.add(requests * output_ns, requests)
            for task_id, rows in rows_by_task.items():
                stats = self._tasks[task_id]
                stats.execution_count += 1
                batch = stats.batches[rows]
                batch.compute_input.add(input_ns)
                batch.compute_infer.add(infer_ns)
                batch.compute_output.add(output_ns)

    def task_stats(self, task_id: str) -> TaskStats:
        """A consistent copy of one task's statistics (zeros if it never ran)."""
        with self._lock:
            stats = self._tasks.get(task_id) or TaskStats()
            copy = TaskStats(
                success=Duration(**vars(stats.success)),
                fail=Duration(**vars(stats.fail)),
                queue=Duration(**vars(stats.queue)),
                compute_input=Duration(**vars(stats.compute_input)),
                compute_infer=Duration(**vars(stats.compute_infer)),
                compute_output=Duration(**vars(stats.compute_output)),
                inference_count=stats.inference_count,
                execution_count=stats.execution_count,
                last_inference_ms=stats.last_inference_ms,
            )
            for size, batch in stats.batches.items():
                copy.batches[size] = BatchDurations(
                    Duration(**vars(batch.compute_input)),
                    Duration(**vars(batch.compute_infer)),
                    Duration(**vars(batch.compute_output)),
                )
        return copy


class TritonCounters(Collector):
    """Triton's cumulative per-model counters, exposed under its exact names (``nv_inference_*``).

    prometheus_client appends ``_total`` to every counter it exposes; Triton's names have no such
    suffix, so these are kept here and exposed untyped under the names Triton uses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[str, str], float]] = {
            name: defaultdict(float) for name in TRITON_COUNTERS
        }

    def add(self, labels: tuple[str, str], **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._values[name][labels] += amount

    def collect(self) -> Iterator[UnknownMetricFamily]:
        with self._lock:
            values = {name: dict(series) for name, series in self._values.items()}
        for name, series in values.items():
            family = UnknownMetricFamily(f"nv_inference_{name}", TRITON_COUNTERS[name], labels=MODEL_LABELS)
            for labels, value in sorted(series.items()):
                family.add_metric(list(labels), value)
            yield family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class HostCollector(Collector):
    """Triton's host gauges, read at scrape time from /proc (Linux; absent elsewhere):
    ``nv_cpu_utilization`` (0..1, all cores, since the previous scrape) and CPU memory."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            times = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        except (OSError, ValueError):
            return
        idle, total = times[3] + (times[4] if len(times) > 4 else 0), sum(times)
        previous, self._last = self._last, (idle, total)
        busy = 0.0
        if previous is not None and total > previous[1]:
            busy = 1.0 - (idle - previous[0]) / (total - previous[1])
        yield GaugeMetricFamily("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", value=busy)
        kib = {key: int(value.split()[0]) * 1024 for key, value in meminfo.items() if value.strip()}
        total_bytes = kib.get("MemTotal", 0)
        used = total_bytes - kib.get("MemAvailable", kib.get("MemFree", 0))
        yield GaugeMetricFamily(
            "nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", value=total_bytes
        )
        yield GaugeMetricFamily("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", value=used)

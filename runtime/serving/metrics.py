"""Server counters: Prometheus metrics (own registry per server) and per-task ModelStatistics."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Expose ``/metrics`` on ``port`` (0 picks a free one); returns the bound port."""
        http, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._http = http
        return http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def record_success(self, task_id: str, seconds: float) -> None:
        self.requests.labels(task_id, "success").inc()
        self.request_seconds.observe(seconds)
        with self._lock:
            stats = self._tasks[task_id]
            stats.success.add(int(seconds * 1e9))
            stats.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, task_id: str, code: str, seconds: float) -> None:
        self.requests.labels(task_id, "failure").inc()
        self.failures.labels(code).inc()
        with self._lock:
            self._tasks[task_id].fail.add(int(seconds * 1e9))

    def record_batch(
        self,
        rows_by_task: dict[str, int],
        queue_ns_by_task: dict[str, list[int]],
        input_ns: int,
        infer_ns: int,
        output_ns: int,
    ) -> None:
        """One executed batch: its size, phases, and which tasks (and how many of their rows) it held."""
        rows = sum(rows_by_task.values())
        self.batch_rows.observe(rows)
        self.batch_tasks.observe(len(rows_by_task))
        self.compute_seconds.observe((input_ns + infer_ns + output_ns) / 1e9)
        for waits in queue_ns_by_task.values():
            for wait in waits:
                self.queue_seconds.observe(wait / 1e9)
        with self._lock:
            for task_id, task_rows in rows_by_task.items():
                stats = self._tasks[task_id]
                requests = len(queue_ns_by_task.get(task_id, ()))
                stats.inference_count += task_rows
                self.images.labels(task_id).inc(task_rows)
                stats.execution_count += 1
                for wait in queue_ns_by_task.get(task_id, ()):
                    stats.queue.add(wait)
                stats.compute_input.add(input_ns, requests)
                stats.compute_infer.add(infer_ns, requests)
                stats.compute_output.add(output_ns, requests)
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

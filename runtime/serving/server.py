"""The serving process: build the stack, bind the gRPC port (TLS, health, reflection), start, drain, stop.

The event loop (``grpc.aio``) only converts messages, answers metadata and awaits results; decoding
runs on a small bounded pool, task loading on one loader thread and every forward on the
batcher's computing thread, so health checks and metadata stay responsive while a batch computes
or a task loads. Request handling itself is ``runtime.serving.inference``; see docs/serving.md.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from protos import POOL
from protos import grpc_service_pb2_grpc as pb_grpc
from runtime.core.files import shown
from runtime.engines.base import InferenceEngine
from runtime.serving.admission import Admission, BoundedPool
from runtime.serving.batcher import Batcher, BatcherConfig
from runtime.serving.http_server import HttpFrontEnd
from runtime.serving.inference import InferenceService
from runtime.serving.metrics import ServerMetrics
from runtime.serving.preprocess import DEFAULT_MAX_PIXELS
from runtime.serving.servicer import SERVICE_NAME, InferenceServicer
from runtime.serving.task_cache import CacheBudget
from runtime.serving.task_store import TaskStore
from runtime.serving.threads import use_one_thread

log = logging.getLogger("e2vpt.server")

# RPCs beyond the in-flight limit that gRPC still accepts, so health checks, metadata and
# refusals get through while inference is full.
CONTROL_RPC_HEADROOM = 64
# Server-side keepalive: a peer that stops answering pings is dropped after about 80 s.
KEEPALIVE_SECONDS = 60
KEEPALIVE_TIMEOUT_SECONDS = 20
LOADER_THREADS = 4
# The memory budget's terms that are not settings (docs/serving.md, "Memory budget"): measured
# on this machine at about 20 KiB per gRPC call and 5 bytes per decoded pixel, with margin.
CALL_OVERHEAD_BYTES = 32 * 1024
DECODE_BYTES_PER_PIXEL = 8
BASE_SLACK_BYTES = 64 * 2**20

# Per-file reflection needs the health service's descriptors in the stubs' pool too.
for _file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
    POOL.AddSerializedFile(_file.serialized_pb)


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8001
    # None: no HTTP/REST front end; 0: a free port (``server.http_port`` tells which).
    http_port: int | None = None
    task_dir: str | Path = "tasks"
    model_control_mode: str = "none"
    load_tasks: list[str] = field(default_factory=list)
    poll_seconds: float = 5.0
    # The task cache (runtime/serving/task_cache.py): None, None keeps every task resident.
    max_resident_tasks: int | None = None
    max_resident_mb: float | None = None
    host_cache_mb: float = 1024.0
    pin_tasks: list[str] = field(default_factory=list)
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 256
    # Triton's priority levels (1 highest; 0: none) and the level of requests that name none (0: lowest).
    priority_levels: int = 0
    default_priority_level: int = 0
    batching: str = "mixed"
    threads: int | None = None
    # False: the caller computes, calling ``server.batcher.run()`` on its own thread after start().
    batcher_thread: bool = True
    grace_seconds: float = 10.0
    max_message_mb: int = 64
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    # The one input metadata and config declare (all three forms are accepted): ``pixels`` as
    # [S, S, 3] lets perf_analyzer make up requests with no --shape or data file.
    declared_input: str = "pixels"
    # Triton's --strict-readiness: ready only when every task that should be loaded is; and
    # --exit-on-error: a package that fails to load at start stops the start.
    strict_readiness: bool = True
    exit_on_error: bool = True
    # None: no metrics endpoint; 0: a free port (``server.metrics_port`` tells which).
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    preprocess_threads: int = 2
    # Admission: inference requests in flight (decoding + queued + computing), and requests
    # waiting for or in decoding; beyond either, UNAVAILABLE at once.
    max_inflight: int = 512
    max_preprocess_backlog: int = 64
    # gRPC limits: concurrent RPCs of all kinds (None: max_inflight + CONTROL_RPC_HEADROOM; the
    # HTTP front end takes the same limit for its calls),
    # concurrent streams per connection, and how long a connection may stay idle.
    max_concurrent_rpcs: int | None = None
    max_streams_per_connection: int = 128
    idle_timeout_seconds: float = 300.0

    def cache_budget(self) -> CacheBudget:
        mib = 2**20
        return CacheBudget(
            max_resident_tasks=self.max_resident_tasks,
            max_resident_bytes=None if self.max_resident_mb is None else int(self.max_resident_mb * mib),
            max_host_bytes=int(self.host_cache_mb * mib),
        )

    @property
    def concurrent_rpcs(self) -> int:
        return self.max_concurrent_rpcs or self.max_inflight + CONTROL_RPC_HEADROOM

    def memory_budget(self, input_size: int, largest_request_bytes: int | None = None) -> int:
        """Bytes the server may grow above idle under any flood of requests of at most
        ``largest_request_bytes`` (default: ``max_message_mb``): every call gRPC accepts holds its
        message, every admitted request at most a decoded batch of ``input_size`` images, and
        each decoding thread one image of at most ``max_image_pixels``."""
        message = largest_request_bytes or self.max_message_mb * 2**20
        front_ends = 2 if self.http_port is not None else 1  # each holds up to concurrent_rpcs calls
        calls = front_ends * self.concurrent_rpcs * (message + CALL_OVERHEAD_BYTES)
        decoded = self.max_inflight * self.max_batch_size * 3 * input_size**2 * 4
        decoding = self.preprocess_threads * self.max_image_pixels * DECODE_BYTES_PER_PIXEL
        return calls + decoded + decoding + BASE_SLACK_BYTES

    def grpc_options(self) -> list[tuple[str, int]]:
        limit = self.max_message_mb * 1024 * 1024
        return [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.max_connection_idle_ms", int(self.idle_timeout_seconds * 1000)),
            ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_SECONDS * 1000),
            # The port is this server's alone: a second server on it fails to start, as Triton does.
            ("grpc.so_reuseport", 0),
        ]


def tls_credentials(cert: str | Path | None, key: str | Path | None) -> grpc.ServerCredentials:
    """Server credentials from PEM files, checked with ``ssl`` first: gRPC itself would only say
    "Failed to bind" for a key that does not match its certificate."""
    if not (cert and key):
        raise ValueError("TLS needs both a certificate and a key file")
    cert, key = Path(cert), Path(key)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"TLS key {key.name} does not match certificate {cert.name}") from None
        raise ValueError(
            f"TLS certificate {cert.name} or key {key.name} is not usable PEM ({error.reason or error})"
        ) from None
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


class ReadinessHealth(health.aio.HealthServicer):
    """gRPC health from the service's readiness at every Check (strict readiness included): never
    SERVING before the server is ready, nor while a task that should be loaded is not."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        super().__init__()
        self._ready = ready

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {shown(request.service)}")
        serving = self._ready() and not self._gracefully_shutting_down
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)


class InferenceServer:
    """The whole serving stack of one process: task store, batcher, gRPC server, metrics."""

    def __init__(self, engine: InferenceEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics()
        self.batcher = Batcher(
            engine,
            BatcherConfig(
                config.max_batch_size,
                config.max_queue_delay_ms / 1000,
                config.max_queue_size,
                config.batching,
                config.threads,
                config.priority_levels,
                config.default_priority_level,
            ),
            self.metrics,
        )
        self.admission = Admission(config.max_inflight)
        self.preprocess_pool = BoundedPool(
            "preprocess", config.preprocess_threads, config.max_preprocess_backlog
        )
        # Loads and unloads run off the event loop and off the batcher's cores. The store serializes
        # loads itself; more than one thread lets an unload pass a slow load.
        self.loader_pool = ThreadPoolExecutor(
            LOADER_THREADS, thread_name_prefix="e2vpt-loader", initializer=use_one_thread
        )
        self.store = TaskStore(
            config.task_dir,
            engine.registry,
            config.model_control_mode,
            self.metrics,
            budget=config.cache_budget(),
            loader=self.loader_pool,
        )
        self.readiness = threading.Event()
        self.service = InferenceService(
            registry=engine.registry,
            batcher=self.batcher,
            store=self.store,
            metrics=self.metrics,
            admission=self.admission,
            preprocess=self.preprocess_pool,
            loader=self.loader_pool,
            ready=self.readiness,
            max_image_pixels=config.max_image_pixels,
            declared_input=config.declared_input,
            strict_readiness=config.strict_readiness,
            expects_tasks=config.model_control_mode != "explicit" or bool(config.load_tasks),
        )
        self.health = ReadinessHealth(self.service.server_ready)
        self.http = HttpFrontEnd(
            self.service, config.max_message_mb * 2**20, config.grace_seconds, config.concurrent_rpcs
        )
        self.port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._becoming_ready: asyncio.Future[None] | None = None

    async def start(self) -> int:
        """Load tasks, start the batcher and bind the ports (0 picks a free one); returns the gRPC port.

        The server is ready once the computing thread has warmed the engine up: before this
        returns with ``batcher_thread``, else once the caller's ``batcher.run()`` has done so.
        A start that fails (a package with ``exit_on_error``, a port in use) releases what it began."""
        cfg = self.config
        credentials = tls_credentials(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert or cfg.tls_key else None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self.loader_pool, self.store.start, cfg.load_tasks, cfg.poll_seconds, cfg.pin_tasks
            )
            failed = self.store.failures()
            if failed and cfg.exit_on_error:
                reasons = "; ".join(f"{task}: {reason}" for task, reason in sorted(failed.items())[:3])
                raise RuntimeError(
                    f"{len(failed)} task package(s) failed to load ({reasons}); fix or remove them, "
                    "or start with --exit-on-error false to serve the others"
                )
            self._server = self._grpc_server()
            self.port = self._bind(self._server, f"{cfg.host}:{cfg.port}", credentials)
            if cfg.batcher_thread:
                self.batcher.start()
            else:
                self.batcher.open()
            await self._server.start()
            if cfg.http_port is not None:
                self.http_port = await self.http.start(cfg.host, cfg.http_port)
            if cfg.metrics_port is not None:
                self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_host)
        except BaseException:
            await self._release()
            raise
        self._becoming_ready = asyncio.ensure_future(self._ready_once_warm(tls=credentials is not None))
        if cfg.batcher_thread:
            await self._becoming_ready
        return self.port

    def _grpc_server(self) -> grpc.aio.Server:
        cfg = self.config
        server = grpc.aio.server(options=cfg.grpc_options(), maximum_concurrent_rpcs=cfg.concurrent_rpcs)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.service), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server, pool=POOL
        )
        return server

    @staticmethod
    def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
        """The bound port; gRPC itself only says "Failed to bind" (or returns 0)."""
        try:
            if credentials is not None:
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if not port:
            raise OSError(f"cannot bind the gRPC port {address}: it is in use or not an address of this host")
        return int(port)

    async def _release(self) -> None:
        """Stop whatever a failed start began (servers, batcher, poller, pools)."""
        if self._server is not None:
            await self._server.stop(None)
        await self.http.stop()
        self.batcher.stop(0)
        self.store.stop()
        self.metrics.close()
        self.preprocess_pool.shutdown()
        self.loader_pool.shutdown(wait=False, cancel_futures=True)

    async def _ready_once_warm(self, tls: bool) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.warmed.wait)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.readiness.set()
        cfg = self.config
        backbone = self.engine.backbone
        log.info(
            "server ready",
            extra={
                "port": self.port,
                "http_port": self.http_port,
                "tls": tls,
                "metrics_port": self.metrics_port,
                "memory_budget_mib": self.config.memory_budget(backbone.spec.img_size) // 2**20,
                "backbone": backbone.spec.name,
                "weights": backbone.source,
                "tasks": sorted(self.engine.registry.snapshot.tasks),
                "model_control_mode": cfg.model_control_mode,
            },
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let accepted requests finish (up to ``grace`` seconds), then release everything."""
        grace = self.config.grace_seconds if grace is None else grace
        if self._becoming_ready is not None:
            self._becoming_ready.cancel()
        self.readiness.clear()
        log.info("shutting down", extra={"grace_seconds": grace, "queued": self.batcher.depth})
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(self._server.stop(grace)) if self._server else None
        http_stopping = asyncio.ensure_future(self.http.stop())
        deadline = time.monotonic() + grace
        # Admitted requests may still be decoding: let them reach the queue and be answered first.
        await loop.run_in_executor(None, self.admission.wait_idle, grace)
        drained = await loop.run_in_executor(None, self.batcher.stop, max(0.0, deadline - time.monotonic()))
        if stopping is not None:
            await stopping
        await http_stopping
        self.store.stop()
        self.metrics.close()
        self.preprocess_pool.shutdown()
        self.loader_pool.shutdown(wait=False, cancel_futures=True)
        log.info("server stopped", extra={"drained": drained})

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class BackgroundServer:
    """Runs an ``InferenceServer`` on its own event loop thread (the command line, tests, the demo)."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve_forever, name="e2vpt-server-loop", daemon=True)
        self._stopping: Future[None] | None = None

    def _serve_forever(self) -> None:
        use_one_thread()
        self._loop.run_forever()

    def __enter__(self) -> InferenceServer:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            raise
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def request_stop(self, grace: float | None = None) -> Future[None]:
        """Begin the graceful stop without waiting for it (safe to call again, e.g. from a signal handler)."""
        if self._stopping is None:
            self._stopping = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop)
        return self._stopping

    def stop(self, grace: float | None = None) -> None:
        if not self._thread.is_alive():
            return
        self.request_stop(grace).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

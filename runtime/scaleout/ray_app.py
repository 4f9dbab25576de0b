"""Ray Serve: N replicas of the serving stack behind Ray's gRPC proxy, KServe v2 registered on it.

Each replica builds what ``python -m runtime serve`` builds (engine, task store on the shared task
directory, batcher on its own thread, ``InferenceService``) and answers the v2 RPCs through the
same ``InferenceServicer``: the proxy hands a replica the decoded request message and returns its
answer, so ``tritonclient`` talks to the proxy unchanged (model name = task id, carried as data:
no Ray multiplexing, no ``@serve.batch``, each replica keeps its own mixed-task batcher).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import HTTPOptions, gRPCOptions
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from protos import grpc_service_pb2 as pb
from runtime.scaleout import proxy_hook  # noqa: F401  (replicas unpickle requests)
from runtime.scaleout.desired import Reconciler, initialize_record
from runtime.serving.server import InferenceServer
from runtime.serving.servicer import InferenceServicer
from runtime.serving.threads import available_cores, use_one_thread

log = logging.getLogger("e2vpt.ray")

# The protos function, re-exported by a module that makes the messages picklable (see there).
SERVICER_FUNCTION = "runtime.scaleout.proxy_hook.add_GRPCInferenceServiceServicer_to_server"
APP_NAME = "e2vpt"
DEPLOYMENT_NAME = "Replica"
HEALTH_CHECK_SECONDS = 2.0
# The controller passes this environment on to the proxies and replicas it starts. The proxy sends
# each request to its replica over gRPC instead of a Ray actor call (a request of more than 100 KB
# no longer goes through Ray's object store): 4.8 ms instead of 10.4 ms at p50 for a 150 KB request
# to a replica that answers at once. A replica runs its methods on its own event loop rather than
# a second one on another thread (the servicer never blocks its loop: batches compute on the
# batcher's thread): the hop 3.1 and 4.0 ms instead of 5.5 ms at p50 in short paired runs.
SERVE_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
# For a Ray instance started here. Ray starts its workers at nice 15, behind its own daemons; here
# the workers are the server (proxy, replicas), and at nice 15 any other process on their cores (the
# client, another job) runs first while the plain server runs at nice 0.
RAY_SYSTEM_CONFIG = {"worker_niceness": 0}

Request = TypeVar("Request")
Response = TypeVar("Response")


class _Aborted(Exception):
    """The servicer aborted the call; its status is on Ray's context."""


class _Context:
    """What ``InferenceServicer`` uses of a ``grpc.aio`` context, over Ray's context.

    The proxy does not pass the client's deadline on, so requests carry none here (the proxy's
    ``request_timeout_s`` and the client's own timeout bound them)."""

    def __init__(self, ray_context: RayServegRPCContext) -> None:
        self._ray_context = ray_context

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        self._ray_context.set_code(code)
        self._ray_context.set_details(details)
        raise _Aborted


class Replica:
    """One replica: the server's stack without its own port; methods named and typed like the RPCs."""

    def __init__(self, args: argparse.Namespace) -> None:
        from runtime.cli import build_engine, server_config  # the replica builds exactly what serve builds

        use_one_thread()
        # Ray's proxy is the only ingress: no port, HTTP front end or metrics endpoint per replica.
        config = replace(server_config(args), batcher_thread=True, metrics_port=None, http_port=None)
        self.server = InferenceServer(build_engine(args), config)
        self.servicer = InferenceServicer(self.server.service)
        store = self.server.store
        self.reconciler = (
            Reconciler(store, args.reconcile_seconds) if config.model_control_mode == "explicit" else None
        )
        # With a record, the record says what is loaded (it started as --load-task).
        store.start([] if self.reconciler else config.load_tasks, config.poll_seconds)
        if self.reconciler is not None:
            self.reconciler.start()
        self.server.batcher.start()
        self.server.batcher.warmed.wait()
        self.server.readiness.set()

    async def check_health(self) -> None:
        """Ray routes only to replicas that pass this, and replaces one that keeps failing it."""
        if not self.server.service.server_ready():
            raise RuntimeError("replica is not ready")

    async def __del__(self) -> None:
        reconciler = getattr(self, "reconciler", None)  # None too when __init__ failed early
        if reconciler is not None:
            reconciler.stop()
        server = getattr(self, "server", None)
        if server is not None:
            await server.stop()

    def replica_report(self, task_id: str) -> dict[str, Any]:
        """For tests and operators: which replica answers, whether it serves ``task_id`` and how much."""
        stats = self.server.metrics.task_stats(task_id)
        return {
            "replica": serve.get_replica_context().replica_id.to_full_id_str(),
            "ready": self.server.service.model_ready(task_id),
            "inference_count": stats.inference_count,
        }

    async def _call(
        self,
        rpc: Callable[[Request, Any], Awaitable[Response]],
        request: Request,
        grpc_context: RayServegRPCContext,
        empty: Callable[[], Response],
    ) -> Response:
        try:
            return await rpc(request, _Context(grpc_context))
        except _Aborted:  # the status is set: the message is not sent
            return empty()

    async def ServerLive(
        self, request: pb.ServerLiveRequest, grpc_context: RayServegRPCContext
    ) -> pb.ServerLiveResponse:
        return await self._call(self.servicer.ServerLive, request, grpc_context, pb.ServerLiveResponse)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, grpc_context: RayServegRPCContext
    ) -> pb.ServerReadyResponse:
        return await self._call(self.servicer.ServerReady, request, grpc_context, pb.ServerReadyResponse)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelReadyResponse:
        return await self._call(self.servicer.ModelReady, request, grpc_context, pb.ModelReadyResponse)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, grpc_context: RayServegRPCContext
    ) -> pb.ServerMetadataResponse:
        return await self._call(
            self.servicer.ServerMetadata, request, grpc_context, pb.ServerMetadataResponse
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelMetadataResponse:
        return await self._call(self.servicer.ModelMetadata, request, grpc_context, pb.ModelMetadataResponse)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelConfigResponse:
        return await self._call(self.servicer.ModelConfig, request, grpc_context, pb.ModelConfigResponse)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelStatisticsResponse:
        return await self._call(
            self.servicer.ModelStatistics, request, grpc_context, pb.ModelStatisticsResponse
        )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, grpc_context: RayServegRPCContext
    ) -> pb.RepositoryIndexResponse:
        return await self._call(
            self.servicer.RepositoryIndex, request, grpc_context, pb.RepositoryIndexResponse
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, grpc_context: RayServegRPCContext
    ) -> pb.RepositoryModelLoadResponse:
        response = await self._call(
            self.servicer.RepositoryModelLoad, request, grpc_context, pb.RepositoryModelLoadResponse
        )
        if self.reconciler is not None and not grpc_context.code():
            await asyncio.to_thread(self.reconciler.record_load, request.model_name)
        return response

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, grpc_context: RayServegRPCContext
    ) -> pb.RepositoryModelUnloadResponse:
        response = await self._call(
            self.servicer.RepositoryModelUnload, request, grpc_context, pb.RepositoryModelUnloadResponse
        )
        if self.reconciler is not None and not grpc_context.code():
            await asyncio.to_thread(self.reconciler.record_unload, request.model_name)
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelInferResponse:
        return await self._call(self.servicer.ModelInfer, request, grpc_context, pb.ModelInferResponse)


def serve_args(argv: list[str]) -> argparse.Namespace:
    """``python -m runtime serve`` options parsed as the command line parses them."""
    from runtime.cli import _add_backbone_args, add_cluster_args, add_server_args

    parser = argparse.ArgumentParser(prog="python -m runtime serve")
    _add_backbone_args(parser)
    add_server_args(parser)
    add_cluster_args(parser)
    return parser.parse_args(argv)


def build_app(args: argparse.Namespace) -> Application:
    """The application of ``args.replicas`` replicas; writes the initial desired-state record.

    Without ``--threads`` each replica computes with its share of this machine's cores, and asks
    Ray for that many CPUs so a cluster places replicas where those cores are free."""
    threads = args.threads or max(1, available_cores() // args.replicas)
    args = argparse.Namespace(**{**vars(args), "threads": threads})
    if args.model_control_mode == "explicit":
        initialize_record(Path(args.task_dir).resolve(), args.load_task)
    deployment = serve.deployment(
        Replica,
        name=DEPLOYMENT_NAME,
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": threads},
        health_check_period_s=HEALTH_CHECK_SECONDS,
        max_ongoing_requests=args.max_inflight,
        logging_config={"enable_access_log": False},  # a log line per request costs the proxy path
    )
    return deployment.bind(args)  # type: ignore[attr-defined]


def start(args: argparse.Namespace) -> DeploymentHandle:
    """Start Serve's proxies on ``--host``: gRPC on ``--port`` (KServe v2 registered), HTTP on
    ``--http-port`` (Ray's, routing nothing here); deploy the application; return its handle once
    every replica is ready. Joins the Ray cluster of ``RAY_ADDRESS`` if set, else starts one."""
    if not ray.is_initialized():
        ray.init(_system_config=RAY_SYSTEM_CONFIG)
    serve.start(
        grpc_options=gRPCOptions(port=args.port, grpc_servicer_functions=[SERVICER_FUNCTION]),
        http_options=HTTPOptions(host=args.host, port=args.http_port),
        controller_options={"runtime_env": {"env_vars": SERVE_ENV}},
    )
    return serve.run(build_app(args), name=APP_NAME)


def serve_forever(args: argparse.Namespace) -> int:
    """``serve --cluster ray``: deploy, then wait for SIGTERM/SIGINT and shut Serve and Ray down."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        start(args)
        log.info("ray serve ready", extra={"port": args.port, "replicas": args.replicas, "app": APP_NAME})
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0

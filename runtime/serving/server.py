"""KServe v2 / Open Inference Protocol gRPC server: model name = task id.

The event loop (``grpc.aio``) only validates, answers metadata and awaits results; image decoding
runs on a small thread pool and every forward on the batcher's worker thread, so health checks
and metadata stay responsive while a batch computes. See docs/serving.md for the input/output
mapping.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from torch import Tensor

from protos import POOL
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import model_config_pb2 as mc
from runtime.core.package import PackageError
from runtime.core.registry import TaskEntry, UnknownTaskError
from runtime.engines.base import InferenceEngine
from runtime.serving.batcher import (
    Batcher,
    BatcherConfig,
    BatchResult,
    DeadlineExpiredError,
    QueueFullError,
    ShuttingDownError,
)
from runtime.serving.metrics import Duration, ServerMetrics
from runtime.serving.preprocess import (
    DEFAULT_MAX_PIXELS,
    InputError,
    check_normalized,
    encoded_to_input,
    pixels_to_input,
)
from runtime.serving.task_store import ModelControlError, TaskNotFoundError, TaskStore
from runtime.serving.threads import use_one_thread

log = logging.getLogger("e2vpt.server")

SERVER_NAME = "e2vpt-serve"
SERVER_VERSION = "0.1.0"
SERVICE_NAME = "inference.GRPCInferenceService"
EXTENSIONS = ("classification", "model_repository", "statistics")
PLATFORM = "e2vpt_vit"
OUTPUT_NAME = "logits"
CLASS_COUNT = "classification"
UNKNOWN_TASK_LABEL = "_unknown"

# Per-file reflection needs the health service's descriptors in the stubs' pool too.
for _file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
    POOL.AddSerializedFile(_file.serialized_pb)


class RpcError(Exception):
    """An answer with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class InputSpec:
    """One accepted input form: name, protocol datatype, metadata shape (batch dim -1), config format."""

    name: str
    datatype: str
    config_type: int
    config_format: int


INPUTS = {
    "image": InputSpec("image", "BYTES", mc.TYPE_STRING, mc.ModelInput.FORMAT_NONE),
    "pixels": InputSpec("pixels", "UINT8", mc.TYPE_UINT8, mc.ModelInput.FORMAT_NHWC),
    "input": InputSpec("input", "FP32", mc.TYPE_FP32, mc.ModelInput.FORMAT_NCHW),
}


def input_dims(name: str, input_size: int) -> list[int]:
    """Dims without the batch dimension, as ModelConfig reports them (-1: any size)."""
    return {"image": [1], "pixels": [-1, -1, 3], "input": [3, input_size, input_size]}[name]


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8001
    task_dir: str | Path = "tasks"
    model_control_mode: str = "none"
    load_tasks: list[str] = field(default_factory=list)
    poll_seconds: float = 5.0
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 256
    batching: str = "mixed"
    threads: int | None = None
    # False: the caller computes, calling ``server.batcher.run()`` on its own thread after start().
    batcher_thread: bool = True
    grace_seconds: float = 10.0
    max_message_mb: int = 64
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    preprocess_threads: int = 2


def serialize_bytes(items: list[bytes]) -> bytes:
    """The protocol's BYTES tensor layout: each element as 4-byte little-endian length + bytes."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InputError("BYTES input is malformed: truncated 4-byte length prefix")
        length = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(raw):
            raise InputError(f"BYTES input is malformed: element of {length} bytes runs past the end")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def classification_strings(logits: Tensor, count: int, labels: list[str] | None) -> list[bytes]:
    """Top-``count`` per row as ``"score:index:label"`` (``"score:index"`` without labels)."""
    scores, indices = logits.topk(min(count, logits.shape[1]), dim=1)
    out = []
    for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True):
        for score, index in zip(row_scores, row_indices, strict=True):
            text = f"{score:f}:{index}" + (f":{labels[index]}" if labels else "")
            out.append(text.encode())
    return out


def duration(value: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=value.count, ns=value.ns)


def _numel(shape: list[int]) -> int:
    return int(np.prod(shape)) if shape else 1


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs over a task store, a batcher and server metrics."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        self.config = server.config
        self.store = server.store
        self.batcher = server.batcher
        self.metrics = server.metrics
        self.registry = server.engine.registry

    # -- helpers -----------------------------------------------------------------------------------

    def _entry(self, name: str, version: str = "") -> TaskEntry:
        try:
            entry = self.registry.get(name)
        except (UnknownTaskError, PackageError):
            raise RpcError(
                grpc.StatusCode.NOT_FOUND, f"unknown task {name!r}: no loaded task has this id"
            ) from None
        if version and version != str(entry.version):
            raise RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"task {name!r} version {version!r} is not loaded (loaded version: {entry.version})",
            )
        return entry

    # -- health and metadata -----------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.server.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self._entry(request.name, request.version)
        except RpcError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.server.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        entry = await self._guard(context, self._entry, request.name, request.version)
        size = entry.info.preprocess.input_size
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=entry.task_id,
            versions=[str(entry.version)],
            platform=PLATFORM,
            inputs=[
                tensor(name=s.name, datatype=s.datatype, shape=[-1, *input_dims(s.name, size)])
                for s in INPUTS.values()
            ],
            outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, entry.num_classes])],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        entry = await self._guard(context, self._entry, request.name, request.version)
        return pb.ModelConfigResponse(config=self.model_config(entry))

    def model_config(self, entry: TaskEntry) -> mc.ModelConfig:
        info, pre = entry.info, entry.info.preprocess
        device = self.registry.backbone.device
        parameters = {
            "accepted_inputs": "exactly one of: image (BYTES, JPEG/PNG), pixels (UINT8 NHWC), "
            "input (FP32 NCHW, normalized)",
            "input_size": str(pre.input_size),
            "mean": ",".join(map(str, pre.mean)),
            "std": ",".join(map(str, pre.std)),
            "resize": pre.resize,
            "crop_pct": str(pre.crop_pct),
            "interpolation": pre.interpolation,
            "num_classes": str(entry.num_classes),
            "labels": "yes" if info.labels else "no",
            "backbone": info.backbone_spec.name,
            "backbone_fingerprint": info.backbone_fingerprint,
            "prefix_rows": str(entry.prefix_len),
        }
        return mc.ModelConfig(
            name=entry.task_id,
            platform=PLATFORM,
            backend="e2vpt",
            version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
            max_batch_size=self.config.max_batch_size,
            input=[
                mc.ModelInput(
                    name=s.name,
                    data_type=s.config_type,
                    format=s.config_format,
                    dims=input_dims(s.name, pre.input_size),
                    optional=True,
                )
                for s in INPUTS.values()
            ],
            output=[
                mc.ModelOutput(
                    name=OUTPUT_NAME,
                    data_type=mc.TYPE_FP32,
                    dims=[entry.num_classes],
                    label_filename="labels" if info.labels else "",
                )
            ],
            dynamic_batching=mc.ModelDynamicBatching(
                max_queue_delay_microseconds=int(self.config.max_queue_delay_ms * 1000)
            ),
            instance_group=[
                mc.ModelInstanceGroup(
                    name=f"{entry.task_id}_0",
                    kind=mc.ModelInstanceGroup.KIND_GPU
                    if device.type == "cuda"
                    else mc.ModelInstanceGroup.KIND_CPU,
                    count=1,
                )
            ],
            parameters={key: mc.ModelParameter(string_value=value) for key, value in parameters.items()},
        )

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            entries = [await self._guard(context, self._entry, request.name, request.version)]
        else:
            entries = sorted(self.registry.snapshot.tasks.values(), key=lambda e: e.task_id)
        response = pb.ModelStatisticsResponse()
        for entry in entries:
            stats = self.metrics.task_stats(entry.task_id)
            model = response.model_stats.add(
                name=entry.task_id,
                version=str(entry.version),
                last_inference=stats.last_inference_ms,
                inference_count=stats.inference_count,
                execution_count=stats.execution_count,
            )
            inference = model.inference_stats
            for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                getattr(inference, name).CopyFrom(duration(getattr(stats, name)))
            for size in sorted(stats.batches):
                batch = stats.batches[size]
                model.batch_stats.add(
                    batch_size=size,
                    compute_input=duration(batch.compute_input),
                    compute_infer=duration(batch.compute_infer),
                    compute_output=duration(batch.compute_output),
                )
            model.memory_usage.add(
                type="CPU" if entry.head_weight.device.type == "cpu" else "GPU", id=0, byte_size=entry.nbytes
            )
        return response

    # -- repository --------------------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for item in self.store.index(ready_only=request.ready):
            response.models.add(name=item.name, version=item.version, state=item.state, reason=item.reason)
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await self._guard(context, self._control_checks, request)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.server.loader_pool, self.store.load, request.model_name)
        except TaskNotFoundError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except PackageError as error:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"failed to load {request.model_name!r}: {error}"
            )
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self._guard(context, self._control_checks, request)
        try:
            self.store.unload(request.model_name)
        except UnknownTaskError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"cannot unload: {error}")
        except PackageError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.RepositoryModelUnloadResponse()

    def _control_checks(self, request: Any) -> None:
        try:
            self.store.check_control_allowed()
        except ModelControlError as error:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, str(error)) from None
        if request.repository_name:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, "named repositories are not supported; leave it empty"
            )
        # Tasks have no dependents, so "unload_dependents" (sent by tritonclient) is moot.
        unsupported = sorted(set(request.parameters) - {"unload_dependents"})
        if unsupported:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"load/unload parameters {unsupported} are not supported; "
                "place the package in the task directory instead",
            )

    async def _guard(self, context: Any, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except RpcError as error:
            await context.abort(error.code, error.message)

    # -- inference ---------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        started = time.perf_counter()
        task_id = request.model_name
        try:
            with self.server.track_inflight():
                response = await self._infer(request, context)
        except RpcError as error:
            # Client-chosen names of tasks that are not loaded share one label: bounded metric cardinality.
            label = task_id if task_id in self.registry else UNKNOWN_TASK_LABEL
            self.metrics.record_failure(label, error.code.name, time.perf_counter() - started)
            log.debug(
                "request failed", extra={"task": task_id, "code": error.code.name, "error": error.message}
            )
            await context.abort(error.code, error.message)
        self.metrics.record_success(task_id, time.perf_counter() - started)
        return response

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        entry = self._entry(request.model_name, request.model_version)
        outputs = self._requested_outputs(request, entry)
        loop = asyncio.get_running_loop()
        try:
            images = await loop.run_in_executor(self.server.preprocess_pool, self._prepare, request, entry)
        except InputError as error:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        try:
            result = await self.batcher.infer(entry.task_id, images, context.time_remaining())
        except QueueFullError as error:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, str(error)) from None
        except ShuttingDownError as error:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, str(error)) from None
        except DeadlineExpiredError as error:
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, str(error)) from None
        except UnknownTaskError as error:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND, f"{error} (unloaded while the request was queued)"
            ) from None
        except ValueError as error:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        except Exception as error:
            log.exception("inference failed", extra={"task": entry.task_id})
            raise RpcError(grpc.StatusCode.INTERNAL, f"inference failed: {error}") from None
        return self._response(request, result, outputs)

    def _requested_outputs(self, request: pb.ModelInferRequest, entry: TaskEntry) -> list[tuple[str, int]]:
        """(name, class_count) per requested output; ``logits`` raw when none is requested."""
        if not request.outputs:
            return [(OUTPUT_NAME, 0)]
        outputs = []
        for output in request.outputs:
            if output.name != OUTPUT_NAME:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"unknown output {output.name!r}; task {entry.task_id!r} has one output, {OUTPUT_NAME!r}",
                )
            count = 0
            if CLASS_COUNT in output.parameters:
                param = output.parameters[CLASS_COUNT]
                kind = param.WhichOneof("parameter_choice")
                if kind not in ("int64_param", "uint64_param"):
                    raise RpcError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"{CLASS_COUNT} must be an integer, got {kind}"
                    )
                count = getattr(param, kind)
                if count < 0:
                    raise RpcError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"{CLASS_COUNT} must be >= 0, got {count}"
                    )
            outputs.append((output.name, count))
        if len(outputs) > 1:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"output {OUTPUT_NAME!r} was requested more than once"
            )
        return outputs

    def _prepare(self, request: pb.ModelInferRequest, entry: TaskEntry) -> Tensor:
        """The request's single input as normalized fp32 ``[N, 3, S, S]``; InputError names the problem."""
        if len(request.inputs) != 1:
            names = [tensor.name for tensor in request.inputs]
            raise InputError(f"send exactly one input, one of {sorted(INPUTS)}; got {names}")
        tensor = request.inputs[0]
        spec = INPUTS.get(tensor.name)
        if spec is None:
            raise InputError(f"unknown input {tensor.name!r}; accepted: {sorted(INPUTS)} (exactly one)")
        if tensor.datatype != spec.datatype:
            raise InputError(f"input {spec.name!r} must have datatype {spec.datatype}, got {tensor.datatype}")
        raw_count = len(request.raw_input_contents)
        if raw_count not in (0, 1):
            raise InputError(f"{raw_count} raw_input_contents for 1 input")
        raw = request.raw_input_contents[0] if raw_count else None
        shape = list(tensor.shape)
        if any(dim <= 0 for dim in shape):
            raise InputError(f"input {spec.name!r} has shape {shape}; every dimension must be positive")
        if not shape or shape[0] > self.config.max_batch_size:
            raise InputError(
                f"input {spec.name!r} has shape {shape}; "
                f"its batch dimension must be 1..{self.config.max_batch_size}"
            )
        pre = entry.info.preprocess
        if spec.name == "image":
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
                raise InputError(f"input 'image' must have shape [N] or [N, 1], got {shape}")
            items = deserialize_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
            if len(items) != shape[0]:
                raise InputError(f"input 'image' has {len(items)} elements, shape {shape} needs {shape[0]}")
            return encoded_to_input(items, pre, self.config.max_image_pixels)
        if spec.name == "pixels":
            if len(shape) != 4 or shape[3] != 3:
                raise InputError(f"input 'pixels' must have shape [N, H, W, 3], got {shape}")
            if shape[1] * shape[2] > self.config.max_image_pixels:
                raise InputError(
                    f"input 'pixels' images of {shape[2]}x{shape[1]} "
                    f"exceed {self.config.max_image_pixels} pixels"
                )
            pixels = self._array(raw, tensor.contents.uint_contents, np.uint8, shape, spec.name)
            return pixels_to_input(pixels, pre)
        if len(shape) != 4:
            raise InputError(
                f"input 'input' must have shape [N, 3, {pre.input_size}, {pre.input_size}], got {shape}"
            )
        images = self._array(raw, tensor.contents.fp32_contents, np.dtype("<f4"), shape, spec.name)
        return check_normalized(images, pre.input_size)

    @staticmethod
    def _array(raw: bytes | None, typed: Any, dtype: Any, shape: list[int], name: str) -> Tensor:
        count = _numel(shape)
        dtype = np.dtype(dtype)
        if raw is not None:
            if len(raw) != count * dtype.itemsize:
                raise InputError(
                    f"input {name!r} has {len(raw)} bytes; "
                    f"shape {shape} of {dtype.name} needs {count * dtype.itemsize}"
                )
            array = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        else:
            if len(typed) != count:
                raise InputError(f"input {name!r} has {len(typed)} values; shape {shape} needs {count}")
            values = np.asarray(typed)
            if dtype == np.uint8 and values.size and int(values.max()) > 255:
                raise InputError(f"input {name!r} holds values above 255, which UINT8 cannot")
            array = values.astype(dtype).reshape(shape)
        return torch.from_numpy(array)

    def _response(
        self, request: pb.ModelInferRequest, result: BatchResult, outputs: list[tuple[str, int]]
    ) -> pb.ModelInferResponse:
        entry = result.entry
        response = pb.ModelInferResponse(
            model_name=entry.task_id, model_version=str(entry.version), id=request.id
        )
        logits = result.logits.float()
        for name, count in outputs:
            if count:
                strings = classification_strings(logits, count, entry.info.labels)
                k = min(count, logits.shape[1])
                response.outputs.add(name=name, datatype="BYTES", shape=[logits.shape[0], k])
                response.raw_output_contents.append(serialize_bytes(strings))
            else:
                response.outputs.add(name=name, datatype="FP32", shape=list(logits.shape))
                response.raw_output_contents.append(logits.numpy().astype("<f4").tobytes())
        return response


class InferenceServer:
    """The whole serving stack of one process: task store, batcher, gRPC server, metrics."""

    def __init__(self, engine: InferenceEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics()
        self.store = TaskStore(config.task_dir, engine.registry, config.model_control_mode, self.metrics)
        self.batcher = Batcher(
            engine,
            BatcherConfig(
                config.max_batch_size,
                config.max_queue_delay_ms / 1000,
                config.max_queue_size,
                config.batching,
                config.threads,
            ),
            self.metrics,
        )
        self.preprocess_pool = ThreadPoolExecutor(
            config.preprocess_threads, thread_name_prefix="e2vpt-preprocess", initializer=use_one_thread
        )
        # Loads and scans run one at a time, off the event loop and off the batcher's cores.
        self.loader_pool = ThreadPoolExecutor(
            1, thread_name_prefix="e2vpt-loader", initializer=use_one_thread
        )
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.ready = False
        self._server: grpc.aio.Server | None = None
        self._inflight = 0
        self._idle = threading.Event()
        self._idle.set()

    @contextmanager
    def track_inflight(self) -> Iterator[None]:
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def start(self) -> int:
        """Load tasks, start the batcher and bind the port (0 picks a free one); returns the port."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.loader_pool, self.store.start, cfg.load_tasks, cfg.poll_seconds)
        if cfg.batcher_thread:
            self.batcher.start()
        else:
            self.batcher.open()
        limit = cfg.max_message_mb * 1024 * 1024
        self._server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server, pool=POOL
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ValueError("TLS needs both a certificate and a key file")
            credentials = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
            )
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        await self._server.start()
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_host)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.ready = True
        backbone = self.engine.backbone
        log.info(
            "server ready",
            extra={
                "port": self.port,
                "tls": bool(cfg.tls_cert),
                "metrics_port": self.metrics_port,
                "backbone": backbone.spec.name,
                "weights": backbone.source,
                "tasks": sorted(self.engine.registry.snapshot.tasks),
                "model_control_mode": cfg.model_control_mode,
            },
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let accepted requests finish (up to ``grace`` seconds), then release everything."""
        grace = self.config.grace_seconds if grace is None else grace
        self.ready = False
        log.info("shutting down", extra={"grace_seconds": grace, "queued": self.batcher.depth})
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(self._server.stop(grace)) if self._server else None
        deadline = time.monotonic() + grace
        # Accepted requests may still be preprocessing: let them reach the queue before closing it.
        await loop.run_in_executor(None, self._idle.wait, grace)
        drained = await loop.run_in_executor(None, self.batcher.stop, max(0.0, deadline - time.monotonic()))
        if stopping is not None:
            await stopping
        self.store.stop()
        self.metrics.close()
        self.preprocess_pool.shutdown(wait=False, cancel_futures=True)
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
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
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

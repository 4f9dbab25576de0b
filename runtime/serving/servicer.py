"""The KServe v2 gRPC service: each RPC converts its message, asks ``InferenceService``, answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from runtime.serving import grpc_codec
from runtime.serving.errors import ServingError
from runtime.serving.inference import InferenceService

SERVICE_NAME = "inference.GRPCInferenceService"
SHARED_MEMORY_REFUSAL = "shared memory is not supported by this server; send tensors in the request"

T = TypeVar("T")


async def _abort(context: Any, error: ServingError) -> NoReturn:
    await context.abort(grpc.StatusCode[error.status.name], error.message)
    raise AssertionError("context.abort returned")  # it raises; this keeps type checkers honest


async def _answer(context: Any, call: Callable[[], T]) -> T:
    try:
        return call()
    except ServingError as error:
        await _abort(context, error)


async def _answer_async(context: Any, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except ServingError as error:
        await _abort(context, error)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs over one ``InferenceService``."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.service.server_live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        metadata = self.service.server_metadata()
        return pb.ServerMetadataResponse(
            name=metadata.name, version=metadata.version, extensions=list(metadata.extensions)
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        metadata = await _answer(context, lambda: self.service.model_metadata(request.name, request.version))
        return grpc_codec.model_metadata(metadata)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        config = await _answer(context, lambda: self.service.model_config(request.name, request.version))
        return pb.ModelConfigResponse(config=grpc_codec.model_config(config))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        models = await _answer(context, lambda: self.service.model_statistics(request.name, request.version))
        return grpc_codec.model_statistics(models)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        entries = await _answer_async(context, lambda: self.service.repository_index(request.ready))
        return grpc_codec.repository_index(entries)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await _answer_async(
            context,
            lambda: self.service.load(
                request.model_name,
                request.repository_name,
                grpc_codec.repository_parameters(request.parameters),
            ),
        )
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await _answer_async(
            context,
            lambda: self.service.unload(
                request.model_name,
                request.repository_name,
                grpc_codec.repository_parameters(request.parameters),
            ),
        )
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            neutral = grpc_codec.infer_request(request)
        except ValueError as error:
            await _abort(context, self.service.reject(request.model_name, error))
        response = await _answer_async(context, lambda: self.service.infer(neutral, deadline))
        return grpc_codec.infer_response(response)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming inference: each request answered on the stream as soon as it is done
        (not in order, as Triton's decoupled-free models do), a failure as ``error_message``.

        Requests of one stream are computed concurrently, so they batch as separate calls do;
        the admission limits bound them like any other request."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                try:
                    neutral = grpc_codec.infer_request(request)
                except ValueError as error:
                    raise self.service.reject(request.model_name, error) from None
                response = await self.service.infer(neutral)
                answers.put_nowait(
                    pb.ModelStreamInferResponse(infer_response=grpc_codec.infer_response(response))
                )
            except ServingError as error:
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                answers.put_nowait(
                    pb.ModelStreamInferResponse(error_message=error.message, infer_response=failed)
                )

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.ensure_future(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (message := await answers.get()) is not None:
                yield message
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # Shared memory (system and CUDA): refused at once, so a client falls back or stops clearly.

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, SHARED_MEMORY_REFUSAL)

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, SHARED_MEMORY_REFUSAL)

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, SHARED_MEMORY_REFUSAL)

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, SHARED_MEMORY_REFUSAL)

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, SHARED_MEMORY_REFUSAL)

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, SHARED_MEMORY_REFUSAL)

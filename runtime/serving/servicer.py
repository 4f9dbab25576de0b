"""The KServe v2 gRPC service: each RPC converts its message, asks ``InferenceService``, answers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from runtime.serving import grpc_codec
from runtime.serving.errors import ServingError
from runtime.serving.inference import InferenceService

SERVICE_NAME = "inference.GRPCInferenceService"

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
            lambda: self.service.load(request.model_name, request.repository_name, list(request.parameters)),
        )
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await _answer_async(
            context,
            lambda: self.service.unload(
                request.model_name, request.repository_name, list(request.parameters)
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

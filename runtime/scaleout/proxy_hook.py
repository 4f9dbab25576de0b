"""What Ray's gRPC proxy imports: the KServe v2 servicer registration, adapted in two ways.

1. protos/ is generated with itself as the include root, so its message classes name their
   modules ``grpc_service_pb2`` and ``model_config_pb2``. The proxy pickles each request message
   (by class) for a replica, so both processes must resolve those names: importing this module
   aliases them.
2. Ray's proxy answers INTERNAL when the replica holding a request dies (``RayActorError``; over
   the proxy's gRPC transport to replicas, ``ActorUnavailableError``), which clients must not
   retry blindly. The request was never answered and another replica can take
   it, so that status becomes UNAVAILABLE (retriable, as Triton uses it). This wraps the proxy's
   per-method handler factory (``gRPCGenericServer.service_handler_factory``, Ray 2.60); without
   that attribute the proxy is left as it is, and tests/test_ray.py says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import grpc

from protos import grpc_service_pb2, model_config_pb2
from protos.grpc_service_pb2_grpc import add_GRPCInferenceServiceServicer_to_server as _add_servicer

sys.modules.setdefault("grpc_service_pb2", grpc_service_pb2)
sys.modules.setdefault("model_config_pb2", model_config_pb2)

# How Ray words a dead or unreachable replica actor in the status details (RayActorError and kin).
REPLICA_LOST_MARKERS = (
    "actor died",
    "actor is dead",
    "actor experienced an error",
    "actordiederror",
    "is unavailable: actor is unavailable",  # ActorUnavailableError: the replica's gRPC server went away
)


def replica_lost(code: grpc.StatusCode | None, details: str | None) -> bool:
    text = (details or "").lower()
    return code == grpc.StatusCode.INTERNAL and any(marker in text for marker in REPLICA_LOST_MARKERS)


def _retriable(handler: Callable[..., Any]) -> Callable[..., Any]:
    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        response = await handler(request, context)
        if replica_lost(context.code(), context.details()):
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(f"the replica serving this request stopped; retry: {context.details()}")
        return response

    return unary_unary


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:
    factory = getattr(server, "service_handler_factory", None)
    if factory is not None:

        def retriable_factory(service_method: str, streaming_type: Any) -> Callable[..., Any]:
            handler = factory(service_method=service_method, streaming_type=streaming_type)
            return _retriable(handler) if streaming_type.name == "UNARY_UNARY" else handler

        server.service_handler_factory = retriable_factory
        try:
            _add_servicer(servicer, server)
        finally:
            server.service_handler_factory = factory
    else:
        _add_servicer(servicer, server)

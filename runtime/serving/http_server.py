"""The KServe v2 HTTP/REST front end (Triton's HTTP API) over the same ``InferenceService`` as gRPC.

Built on aiohttp, on the event loop that already runs ``grpc.aio``: both front ends then await the
same service, batcher futures and executors without crossing threads, and inherit the rule that
nothing on the loop blocks (a WSGI or threaded server would add a thread pool, and with it
another concurrency limit and another memory term). aiohttp is asyncio-native, maintained, and
streams bodies with a size cap (``client_max_size``) checked before a body is buffered.

Answers follow Triton: JSON bodies, errors as ``{"error": message}`` with Triton's HTTP code for
the status (``HTTP_STATUS``), health and readiness as 200 or 400 with an empty body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from runtime.serving import http_codec
from runtime.serving.errors import ServingError, Status
from runtime.serving.inference import InferenceService
from runtime.serving.preprocess import InputError

log = logging.getLogger("e2vpt.server")

# Triton's http_server.cc (HttpCodeFromError): INTERNAL 500, NOT_FOUND 404, UNAVAILABLE 503,
# UNSUPPORTED 501, everything else 400. Triton answers a full queue and an expired request
# timeout with UNAVAILABLE, so RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED are 503 here too.
HTTP_STATUS = {
    Status.INVALID_ARGUMENT: 400,
    Status.NOT_FOUND: 404,
    Status.UNAVAILABLE: 503,
    Status.RESOURCE_EXHAUSTED: 503,
    Status.DEADLINE_EXCEEDED: 503,
    Status.CANCELLED: 400,
    Status.ABORTED: 400,
    Status.INTERNAL: 500,
}
NOT_IMPLEMENTED = 501
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(value, separators=(",", ":")).encode(), status=status, content_type="application/json"
    )


def error_response(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _state(ok: bool) -> web.Response:
    """Triton's health and readiness answers: 200 when true, 400 when not, no body."""
    return web.Response(status=200 if ok else 400)


class HttpFrontEnd:
    """Routes of the v2 HTTP API; ``application()`` builds the aiohttp app for ``serve``.

    At most ``max_concurrent`` calls are handled at once (beyond: 503 before the body is read),
    so HTTP bodies are bounded in total as gRPC messages are by ``--max-concurrent-rpcs``."""

    def __init__(
        self, service: InferenceService, max_body_bytes: int, grace_seconds: float, max_concurrent: int
    ) -> None:
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.grace_seconds = grace_seconds
        self.max_concurrent = max_concurrent
        self._active = 0
        self._runner: web.AppRunner | None = None

    @web.middleware
    async def _limits_and_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The concurrency limit, and every failure as Triton's ``{"error": ...}`` body (service
        errors, malformed bodies, aiohttp's own refusals)."""
        if self._active >= self.max_concurrent:
            return error_response(503, f"more than {self.max_concurrent} HTTP calls at once; retry later")
        self._active += 1  # the event loop is the only thread here: no lock needed
        try:
            return await handler(request)
        except ServingError as error:
            return error_response(HTTP_STATUS[error.status], error.message)
        except InputError as error:
            return error_response(400, str(error)[:1024])
        except web.HTTPException as error:
            if error.status < 400:
                raise
            return error_response(error.status, error.reason)
        finally:
            self._active -= 1

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._limits_and_errors], client_max_size=self.max_body_bytes)
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2/models/stats", self.statistics)
        for prefix in (versioned, model):
            app.router.add_get(prefix, self.model_metadata)
            app.router.add_get(prefix + "/ready", self.model_ready)
            app.router.add_get(prefix + "/config", self.model_config)
            app.router.add_get(prefix + "/stats", self.statistics)
            app.router.add_post(prefix + "/infer", self.infer)
        app.router.add_post("/v2/repository/index", self.repository_index)
        app.router.add_post("/v2/repository/models/{model}/load", self.load)
        app.router.add_post("/v2/repository/models/{model}/unload", self.unload)
        for extension in ("systemsharedmemory", "cudasharedmemory"):
            app.router.add_route("*", f"/v2/{extension}" + "{tail:.*}", self.not_implemented)
        return app

    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (0: a free port) on the running loop; returns the bound port."""
        self._runner = web.AppRunner(
            self.application(), access_log=None, handle_signals=False, shutdown_timeout=self.grace_seconds
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_port=False)
        await site.start()
        bound = self._runner.addresses[0][1]
        return int(bound)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers ----------------------------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(http_codec.server_metadata(self.service.server_metadata()))

    async def live(self, request: web.Request) -> web.Response:
        return _state(self.service.server_live())

    async def ready(self, request: web.Request) -> web.Response:
        return _state(self.service.server_ready())

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        return _state(self.service.model_ready(name, version))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(http_codec.model_metadata(self.service.model_metadata(*_model(request))))

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(http_codec.model_config(self.service.model_config(*_model(request))))

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        return _json(http_codec.model_statistics(self.service.model_statistics(name, version)))

    async def repository_index(self, request: web.Request) -> web.Response:
        body = http_codec.json_object(await request.read(), "repository index request")
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InputError("'ready' must be a boolean")
        return _json(http_codec.repository_index(await self.service.repository_index(ready)))

    async def load(self, request: web.Request) -> web.Response:
        parameters = http_codec.control_parameters(await request.read())
        await self.service.load(request.match_info["model"], "", parameters)
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        parameters = http_codec.control_parameters(await request.read())
        await self.service.unload(request.match_info["model"], "", parameters)
        return web.Response(status=200)

    async def not_implemented(self, request: web.Request) -> web.Response:
        return error_response(
            NOT_IMPLEMENTED, "shared memory is not supported by this server; send tensors in the request"
        )

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        body = await request.read()
        try:
            parsed, binary_default = http_codec.infer_request(
                name, version, body, request.headers.get(http_codec.HEADER_LENGTH)
            )
            neutral, binary = http_codec.without_encoding(parsed)
        except InputError as error:
            raise self.service.reject(name, error) from None
        response = await self.service.infer(neutral)
        if not neutral.outputs:
            binary = [binary_default] * len(response.outputs)
        payload, header_length = http_codec.infer_response(response, binary)
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={http_codec.HEADER_LENGTH: str(header_length)},
        )


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("model", ""), request.match_info.get("version", "")

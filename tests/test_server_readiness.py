"""Readiness as Triton's --strict-readiness and --exit-on-error define it, and exclusive ports.

Repositories: empty, failed (every package corrupt) and partial (one good, one corrupt), each in
strict and lax mode; readiness is checked over gRPC ServerReady, gRPC health and HTTP.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server_helpers import start_server, write_tasks

CORRUPT = b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"


def repository(kind: str, backbone, directory: Path) -> Path:
    if kind in ("partial",):
        write_tasks(backbone, directory, 1)
    if kind in ("failed", "partial"):
        (directory / "broken.safetensors").write_bytes(CORRUPT)
    return directory


def readiness(server) -> tuple[bool, bool, int]:
    """(ServerReady, gRPC health SERVING, HTTP /v2/health/ready status)."""
    address = f"127.0.0.1:{server.port}"
    with grpcclient.InferenceServerClient(address) as client:
        ready = client.is_server_ready()
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{server.http_port}/v2/health/ready", timeout=10
        ) as http:
            status = http.status
    except urllib.error.HTTPError as error:
        status = error.code
    return ready, answer.status == health_pb2.HealthCheckResponse.SERVING, status


@pytest.mark.parametrize("kind", ["empty", "failed", "partial"])
@pytest.mark.parametrize("strict", [True, False])
def test_readiness_of_empty_failed_and_partial_repositories(tiny_backbone, tmp_path, kind, strict):
    directory = repository(kind, tiny_backbone, tmp_path)
    settings = {"model_control_mode": "none", "load_tasks": [], "http_port": 0}
    with start_server(
        tiny_backbone, directory, strict_readiness=strict, exit_on_error=False, **settings
    ) as server:
        # Strict: nothing to serve, or a package that should be loaded is not. Lax: up is ready.
        expected = (not strict, not strict, 400 if strict else 200)
        assert readiness(server) == expected
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
            index = {m.name: m for m in client.get_model_repository_index().models}
            if kind != "empty":
                assert index["broken"].state == "UNAVAILABLE" and "corrupt" in index["broken"].reason
            if kind == "partial":  # the good task serves either way
                assert index["task-0"].state == "READY" and client.is_model_ready("task-0")


def test_explicit_mode_with_nothing_asked_is_ready_when_empty(tiny_backbone, tmp_path):
    with start_server(tiny_backbone, tmp_path, load_tasks=[], http_port=0) as server:
        assert readiness(server) == (True, True, 200)


def test_exit_on_error_stops_the_start_and_names_the_package(tiny_backbone, tmp_path):
    repository("partial", tiny_backbone, tmp_path)
    with (
        pytest.raises(RuntimeError, match=r"1 task package\(s\) failed to load \(broken: .*corrupt"),
        start_server(tiny_backbone, tmp_path, model_control_mode="none", load_tasks=[]),
    ):
        pass


def test_ports_are_exclusive(tiny_backbone, tmp_path):
    write_tasks(tiny_backbone, tmp_path, 1)
    with start_server(tiny_backbone, tmp_path, http_port=0) as first:
        with (
            pytest.raises(OSError, match=f"cannot bind the gRPC port 127.0.0.1:{first.port}"),
            start_server(tiny_backbone, tmp_path, port=first.port),
        ):
            pass
        with pytest.raises(OSError), start_server(tiny_backbone, tmp_path, http_port=first.http_port):
            pass
        assert readiness(first) == (True, True, 200), "the first server is untouched"

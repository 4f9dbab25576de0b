"""The deployment files, checked as far as this machine can: the image's command line parses with the
server's own parser, and the KServe manifest against the ``kserve`` SDK's models (every field known
to ``V1beta1InferenceService`` and the Kubernetes types it nests) when the SDK is installed."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime import cli

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFEST = DEPLOY / "kserve" / "inferenceservice.yaml"
KSERVE_GRPC_PORT = 8081
IMAGE_BATCH_MB = 64


@pytest.fixture
def parse_serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``python -m runtime ARGS`` parsed by ``cli.main`` up to the point it would start serving."""
    parsed: list[Any] = []
    monkeypatch.setattr(cli, "cmd_serve", lambda args: parsed.append(args) or 0)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def parse(argv: list[str]) -> Any:
        assert cli.main(argv) == 0
        return parsed.pop()

    yield parse
    root.handlers[:], root.level = handlers, level


def dockerfile_instruction(name: str) -> list[str]:
    """An exec-form instruction's words (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    match = re.search(rf"^{name}\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert match, f"no exec-form {name} in deploy/Dockerfile"
    return list(json.loads(match.group(1)))


def test_the_image_runs_the_server_cli_and_its_arguments_parse(parse_serve: Any) -> None:
    entrypoint, command = dockerfile_instruction("ENTRYPOINT"), dockerfile_instruction("CMD")
    assert entrypoint[:3] == ["python", "-m", "runtime"]
    args = parse_serve(entrypoint[3:] + command)
    assert args.command == "serve" and args.port == KSERVE_GRPC_PORT
    assert args.max_message_mb >= IMAGE_BATCH_MB and args.task_dir.startswith("/models")


def test_the_cuda_variant_is_documented() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "--build-arg BASE=" in text and "cuda" in text and "ARG BASE=" in text


def test_the_manifest_serves_v2_grpc_on_8081_with_raised_limits(parse_serve: Any) -> None:
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    (container,) = manifest["spec"]["predictor"]["containers"]
    assert container["ports"] == [{"name": "h2c", "containerPort": KSERVE_GRPC_PORT, "protocol": "TCP"}]
    assert container["readinessProbe"]["grpc"]["port"] == KSERVE_GRPC_PORT
    args = parse_serve(["serve", *container["args"]])
    assert args.port == KSERVE_GRPC_PORT and args.max_message_mb >= IMAGE_BATCH_MB
    assert shlex.join(container["args"])  # plain strings only: Kubernetes rejects numbers in args


def _check_fields(value: Any, type_name: str, path: str) -> None:
    """Every key of ``value`` is a field of the SDK model ``type_name``, recursively."""
    import kserve
    import kubernetes.client

    if type_name.startswith("list["):
        assert isinstance(value, list), path
        for index, item in enumerate(value):
            _check_fields(item, type_name[5:-1], f"{path}[{index}]")
        return
    if type_name.startswith("dict("):
        assert isinstance(value, dict), path
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        for key, item in value.items():
            _check_fields(item, inner, f"{path}.{key}")
        return
    model = getattr(kserve, type_name, None) or getattr(kubernetes.client, type_name, None)
    if model is None:  # a primitive (str, int, bool, object, datetime, ...)
        return
    assert isinstance(value, dict), f"{path}: expected an object ({type_name})"
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key, item in value.items():
        assert key in fields, f"{path}.{key}: not a field of {type_name}"
        _check_fields(item, model.openapi_types[fields[key]], f"{path}.{key}")


def validate_with_sdk() -> None:
    """Check the manifest against the SDK's models (run in a fresh interpreter, see below)."""
    import kserve

    manifest = yaml.safe_load(MANIFEST.read_text())
    _check_fields(manifest, "V1beta1InferenceService", "InferenceService")
    built = kserve.V1beta1InferenceService(
        api_version=manifest["apiVersion"], kind=manifest["kind"], metadata=manifest["metadata"]
    )
    assert built.to_dict()["kind"] == "InferenceService"


def test_the_manifest_fits_the_kserve_sdk_models() -> None:
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("validated against the kserve SDK's models when it is installed")
    # kserve registers its own copy of the v2 protocol in protobuf's default pool, which clashes with
    # tritonclient's once both are imported: check in a process of its own.
    check = "from tests.test_deploy import validate_with_sdk; validate_with_sdk()"
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]

"""The HTTP/REST v2 front end against a real server: tritonclient.http and plain HTTP (JSON and binary).

Every answer is compared with the gRPC path of the same server (same service, batcher, statistics),
and every error case of tests/test_server.py has its HTTP status (Triton's mapping).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from runtime.serving.server import BackgroundServer, InferenceServer, ServerConfig
from tests.server_helpers import (
    RecordingEngine,
    normalized_images,
    png_bytes,
    reference_engine,
    start_server,
    write_tasks,
)

TASKS = 3


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("http-tasks")


@pytest.fixture(scope="module")
def packages(tiny_backbone, task_dir):
    return write_tasks(tiny_backbone, task_dir, TASKS)


@pytest.fixture(scope="module")
def server(tiny_backbone, task_dir, packages):
    with start_server(tiny_backbone, task_dir, max_message_mb=2, http_port=0) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    triton = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as triton:
        yield triton


def fp32_input(array: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array.astype(np.float32), binary_data=binary)
    return tensor


def grpc_logits(grpc_client, task: str, array: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("input", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array.astype(np.float32))
    return grpc_client.infer(task, [tensor]).as_numpy("logits")


def http(server, method: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, dict, bytes]:
    """Status, headers and body of one plain HTTP call (errors included)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def expect_status(status: int, fragment: str, call, *args, **kwargs) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    assert caught.value.status() == str(status), caught.value
    assert fragment in caught.value.message(), caught.value.message()


def test_health_metadata_config_and_statistics(server, client, grpc_client, packages):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "e2vpt-serve"
    assert client.is_model_ready("task-1") and client.is_model_ready("task-1", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("task-1", "7")
    metadata = client.get_model_metadata("task-1")
    expected = grpc_client.get_model_metadata("task-1", as_json=True)
    assert metadata["versions"] == expected["versions"] == ["1"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in expected["inputs"]] == [
        (t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]
    ]
    config = client.get_model_config("task-1")
    assert config["max_batch_size"] == 16
    # 64-bit integers as JSON numbers, as Triton writes its config (perf_analyzer reads them so).
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    size = packages[1].preprocess.input_size
    assert config["input"] == [
        {"name": "pixels", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [size, size, 3]}
    ]
    assert config["output"][0]["dims"] == [packages[1].num_classes]
    assert config["parameters"]["input_size"]["string_value"] == str(packages[1].preprocess.input_size)
    stats = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in stats} >= {f"task-{i}" for i in range(TASKS)}
    assert all(s["memory_usage"][0]["byte_size"] > 0 for s in stats)
    expect_status(404, "unknown task 'nope'", client.get_model_metadata, "nope")
    expect_status(404, "version '7'", client.get_model_config, "task-1", "7")
    expect_status(404, "unknown task", client.get_inference_statistics, "nope")
    status, _, body = http(server, "GET", "/v2/health/ready")
    assert (status, body) == (200, b"")
    status, _, body = http(server, "GET", "/v2/no/such/path")
    assert status == 404 and "error" in json.loads(body)


def test_logits_equal_the_grpc_path_in_every_encoding(server, client, grpc_client, packages):
    size = packages[0].preprocess.input_size
    images = normalized_images(3, size, seed=1)
    expected = grpc_logits(grpc_client, "task-0", images)
    for binary_in in (True, False):
        for binary_out in (True, False):
            wanted = httpclient.InferRequestedOutput("logits", binary_data=binary_out)
            result = client.infer(
                "task-0", [fp32_input(images, binary_in)], outputs=[wanted], request_id="r1"
            )
            np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-6)
            assert result.get_response()["id"] == "r1" and result.get_response()["model_version"] == "1"
    # No outputs named: tritonclient asks for binary_data_output.
    np.testing.assert_allclose(client.infer("task-0", [fp32_input(images)]).as_numpy("logits"), expected)
    # Plain JSON, nested data, as curl would send it.
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": list(images.shape), "datatype": "FP32", "data": images.tolist()}
            ]
        }
    ).encode()
    status, headers, answer = http(server, "POST", "/v2/models/task-0/infer", body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    output = json.loads(answer)["outputs"][0]
    assert output["shape"] == list(expected.shape)
    np.testing.assert_allclose(np.array(output["data"]).reshape(expected.shape), expected, atol=1e-5)
    # Plain binary: JSON header, then the tensor's bytes; binary logits come back.
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(images.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": images.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, answer = http(
        server,
        "POST",
        "/v2/models/task-0/versions/1/infer",
        header + images.astype("<f4").tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200
    length = int(headers["Inference-Header-Content-Length"])
    output = json.loads(answer[:length])["outputs"][0]
    assert output["parameters"]["binary_data_size"] == len(answer) - length
    np.testing.assert_allclose(np.frombuffer(answer[length:], "<f4").reshape(expected.shape), expected)


def test_images_and_classification(client, grpc_client, packages):
    encoded = [png_bytes(40, 35, seed=3), png_bytes(32, 32, seed=4)]
    tensor = httpclient.InferInput("image", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_).reshape(2, 1))
    same = grpcclient.InferInput("image", [2, 1], "BYTES")
    same.set_data_from_numpy(np.array(encoded, dtype=np.object_).reshape(2, 1))
    expected = grpc_client.infer("task-2", [same]).as_numpy("logits")
    np.testing.assert_allclose(client.infer("task-2", [tensor]).as_numpy("logits"), expected, atol=1e-6)
    for binary in (True, False):
        wanted = httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=3)
        top = client.infer("task-2", [tensor], outputs=[wanted]).as_numpy("logits")
        assert top.shape == (2, 3)
        for row in range(2):
            best = np.argsort(-expected[row])[:3]
            for item, index in zip(top[row], best, strict=True):
                text = item.decode() if isinstance(item, bytes) else item
                _, text_index, label = text.split(":")
                assert int(text_index) == index and label == f"task-2-label-{index}"


def test_every_grpc_error_case_has_its_http_status(server, client, packages):
    size = packages[0].preprocess.input_size
    good = normalized_images(1, size, seed=8)
    wrong_dtype = httpclient.InferInput("input", [1, 3, size, size], "FP64")
    wrong_dtype.set_data_from_numpy(good.astype(np.float64))
    junk = httpclient.InferInput("image", [1], "BYTES")
    junk.set_data_from_numpy(np.array([b"definitely not a png"], dtype=np.object_))
    nan = good.copy()
    nan[0, 1, 2, 3] = np.nan
    unknown_input = httpclient.InferInput("pictures", [1], "BYTES")
    unknown_input.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    cases = [
        (404, "unknown task 'missing'", "missing", [fp32_input(good)]),
        (400, "must have datatype FP32, got FP64", "task-0", [wrong_dtype]),
        (
            400,
            f"must be FP32 [N, 3, {size}, {size}]",
            "task-0",
            [fp32_input(normalized_images(1, size + 8, 1))],
        ),
        (400, "image 0: image could not be decoded", "task-0", [junk]),
        (400, "contain NaN", "task-0", [fp32_input(nan)]),
        (400, "batch dimension must be 1..16", "task-0", [fp32_input(normalized_images(17, size, seed=2))]),
        (400, "send exactly one input", "task-0", [fp32_input(good), fp32_input(good)]),
        (400, "unknown input 'pictures'", "task-0", [unknown_input]),
    ]
    for status, fragment, task, inputs in cases:
        expect_status(status, fragment, client.infer, task, inputs)
    expect_status(
        400,
        "unknown output 'probs'",
        client.infer,
        "task-0",
        [fp32_input(good)],
        outputs=[httpclient.InferRequestedOutput("probs")],
    )
    expect_status(
        404, "version '7' is not loaded", client.infer, "task-0", [fp32_input(good)], model_version="7"
    )
    # A byte count that does not fit the shape, binary data no input declares, and bad JSON.
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, 8, 8, 3],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": 100},
                }
            ]
        }
    ).encode()
    status, _, body = http(
        server,
        "POST",
        "/v2/models/task-0/infer",
        header + bytes(100),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert (
        status == 400 and "has 100 bytes; shape [1, 8, 8, 3] of uint8 needs 192" in json.loads(body)["error"]
    )
    status, _, body = http(
        server,
        "POST",
        "/v2/models/task-0/infer",
        header + bytes(101),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 400 and "1 bytes of binary data follow" in json.loads(body)["error"]
    status, _, body = http(server, "POST", "/v2/models/task-0/infer", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    # 3 MiB against a 2 MiB body limit: refused before it is buffered.
    big = np.zeros((1, 3, 512, 512), dtype=np.float32)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("task-0", [fp32_input(big)])
    assert caught.value.status() == "413"
    # Shared memory is refused at once, not half-supported.
    expect_status(501, "shared memory is not supported", client.get_system_shared_memory_status)
    expect_status(501, "shared memory is not supported", client.register_system_shared_memory, "r", "/k", 64)
    assert client.infer("task-0", [fp32_input(good)]).as_numpy("logits").shape == (1, packages[0].num_classes)
    failed = client.get_inference_statistics("task-0")["model_stats"][0]["inference_stats"]["fail"]["count"]
    assert failed >= 8


def test_repository_load_replace_unload(server, client, tiny_backbone, task_dir, tmp_path):
    index = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert {f"task-{i}" for i in range(TASKS)} <= {n for n, s in index.items() if s == "READY"}
    extra = write_tasks(tiny_backbone, task_dir, 1, prefix="http-extra")[0]
    client.load_model("http-extra-0")
    client.load_model("http-extra-0")
    assert client.get_model_metadata("http-extra-0")["versions"] == ["2"]
    size = extra.preprocess.input_size
    result = client.infer("http-extra-0", [fp32_input(normalized_images(1, size, seed=10))])
    assert result.get_response()["model_version"] == "2"
    client.unload_model("http-extra-0")
    assert not client.is_model_ready("http-extra-0")
    expect_status(404, "cannot unload", client.unload_model, "http-extra-0")
    expect_status(404, "no package", client.load_model, "absent")
    expect_status(400, "is not allowed", client.load_model, ".hidden")
    (task_dir / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    expect_status(400, "truncated or corrupt", client.load_model, "broken")
    os.unlink(task_dir / "broken.safetensors")
    status, _, body = http(
        server, "POST", "/v2/repository/models/task-0/load", b'{"parameters": {"config": "{}"}}'
    )
    assert status == 400 and "not supported" in json.loads(body)["error"]


def test_model_control_none_refuses_load_and_unload_with_503(tiny_backbone, tmp_path):
    write_tasks(tiny_backbone, tmp_path, 1)
    with start_server(
        tiny_backbone, tmp_path, model_control_mode="none", load_tasks=[], http_port=0
    ) as running:
        triton = httpclient.InferenceServerClient(f"127.0.0.1:{running.http_port}")
        expect_status(503, "not allowed", triton.load_model, "task-0")
        expect_status(503, "not allowed", triton.unload_model, "task-0")
        triton.close()


def test_concurrent_http_calls_are_bounded_before_bodies_are_read(tiny_backbone, tmp_path):
    packages = write_tasks(tiny_backbone, tmp_path, 1)
    size = packages[0].preprocess.input_size
    engine = RecordingEngine(reference_engine(tiny_backbone, []))
    engine.release.clear()
    config = ServerConfig(host="127.0.0.1", port=0, http_port=0, task_dir=tmp_path, max_concurrent_rpcs=1)
    with BackgroundServer(InferenceServer(engine, config)) as server, ThreadPoolExecutor(1) as pool:
        triton = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        held = pool.submit(triton.infer, "task-0", [fp32_input(normalized_images(1, size, 0))])
        assert engine.started.wait(10)
        status, _, body = http(server, "GET", "/v2/health/live")
        assert status == 503 and "more than 1 HTTP calls at once" in json.loads(body)["error"]
        engine.release.set()
        assert held.result(30).as_numpy("logits").shape == (1, packages[0].num_classes)
        assert http(server, "GET", "/v2/health/live")[0] == 200
        triton.close()

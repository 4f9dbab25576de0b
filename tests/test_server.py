"""A real server on loopback, queried with the real tritonclient: every RPC, parity, batching, errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import aio as aioclient
from tritonclient.utils import InferenceServerException

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from runtime.serving.preprocess import encoded_to_input, pixels_to_input
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
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="module")
def packages(tiny_backbone, task_dir):
    return write_tasks(tiny_backbone, task_dir, TASKS)


@pytest.fixture(scope="module")
def reference(tiny_backbone, packages):
    return reference_engine(tiny_backbone, packages)


@pytest.fixture(scope="module")
def server(tiny_backbone, task_dir, packages):
    with start_server(tiny_backbone, task_dir, max_message_mb=2, metrics_port=0) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as triton:
        yield triton


def fp32_input(array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array.astype(np.float32))
    return tensor


def expect_error(code: grpc.StatusCode, fragment: str, call, *args, **kwargs) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    assert caught.value.status() == f"StatusCode.{code.name}", caught.value
    assert fragment in caught.value.message(), caught.value.message()


def test_health_and_server_rpcs(server, client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "e2vpt-serve" and "classification" in metadata.extensions
    assert client.is_model_ready("task-0") and not client.is_model_ready("no-such-task")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        services = {
            s.name
            for r in reflect.ServerReflectionInfo(iter([request]))
            for s in r.list_services_response.service
        }
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.ModelInferRequest")
        answers = list(reflect.ServerReflectionInfo(iter([symbol])))
        assert answers[0].file_descriptor_response.file_descriptor_proto


def test_model_metadata_and_config(client, packages):
    package = packages[1]
    size = package.preprocess.input_size
    metadata = client.get_model_metadata("task-1")
    assert metadata.versions == ["1"]
    # One declared input with static dims (what perf_analyzer needs); the others are still accepted.
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("pixels", "UINT8", [-1, size, size, 3])
    ]
    assert [(o.name, o.datatype, list(o.shape)) for o in metadata.outputs] == [
        ("logits", "FP32", [-1, package.num_classes])
    ]
    config = client.get_model_config("task-1").config
    assert config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 20000
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [("pixels", [size, size, 3], False)]
    assert config.input[0].format == config.input[0].FORMAT_NHWC
    assert config.parameters["input_size"].string_value == str(size)
    expect_error(grpc.StatusCode.NOT_FOUND, "unknown task 'nope'", client.get_model_metadata, "nope")
    expect_error(grpc.StatusCode.NOT_FOUND, "version '7'", client.get_model_config, "task-1", "7")


def test_infer_each_input_form_matches_in_process_forward(client, packages, reference):
    size = packages[0].preprocess.input_size
    pre = packages[0].preprocess
    # fp32, batched
    images = normalized_images(3, size, seed=1)
    result = client.infer("task-0", [fp32_input(images)])
    expected = torch.stack(reference.forward(torch.from_numpy(images), ["task-0"] * 3))
    assert result.get_response().model_version == "1"
    np.testing.assert_allclose(result.as_numpy("logits"), expected.numpy(), atol=1e-5)
    # uint8 pixels of another size, resized server-side
    pixels = np.random.default_rng(2).integers(0, 256, (2, size + 9, size + 3, 3), dtype=np.uint8)
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer("task-1", [tensor])
    expected = torch.stack(reference.forward(pixels_to_input(torch.from_numpy(pixels), pre), ["task-1"] * 2))
    np.testing.assert_allclose(result.as_numpy("logits"), expected.numpy(), atol=1e-5)
    # encoded PNGs of different sizes in one request, shape [N, 1]
    encoded = [png_bytes(size + 20, size + 5, seed=3), png_bytes(size, size, seed=4)]
    tensor = grpcclient.InferInput("image", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_).reshape(2, 1))
    result = client.infer("task-2", [tensor])
    expected = torch.stack(reference.forward(encoded_to_input(encoded, pre), ["task-2"] * 2))
    np.testing.assert_allclose(result.as_numpy("logits"), expected.numpy(), atol=1e-5)


def test_typed_contents_instead_of_raw(server, reference, packages):
    size = packages[0].preprocess.input_size
    images = normalized_images(1, size, seed=5)
    request = pb.ModelInferRequest(model_name="task-0", id="typed-1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(images.shape))
    tensor.contents.fp32_contents.extend(images.ravel().tolist())
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.id == "typed-1" and list(response.outputs[0].shape) == [1, packages[0].num_classes]
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    expected = reference.forward(torch.from_numpy(images), ["task-0"])[0]
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)


def test_classification_extension(client, packages, reference):
    size = packages[2].preprocess.input_size
    images = normalized_images(2, size, seed=6)
    wanted = grpcclient.InferRequestedOutput("logits", class_count=3)
    result = client.infer("task-2", [fp32_input(images)], outputs=[wanted])
    top = result.as_numpy("logits")
    assert top.shape == (2, 3)
    logits = torch.stack(reference.forward(torch.from_numpy(images), ["task-2"] * 2))
    for row in range(2):
        scores, indices = logits[row].topk(3)
        for item, score, index in zip(top[row], scores.tolist(), indices.tolist(), strict=True):
            text_score, text_index, label = item.decode().split(":")
            assert int(text_index) == index and label == f"task-2-label-{index}"
            assert abs(float(text_score) - score) < 1e-5


def test_mixed_task_batches_form_under_concurrency(server, packages, reference):
    size = packages[0].preprocess.input_size
    images = normalized_images(48, size, seed=7)
    tasks = [f"task-{i % TASKS}" for i in range(48)]

    async def burst() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(f"127.0.0.1:{server.port}") as triton:

            async def one(index: int) -> np.ndarray:
                tensor = aioclient.InferInput("input", [1, 3, size, size], "FP32")
                tensor.set_data_from_numpy(images[index : index + 1])
                return (await triton.infer(tasks[index], [tensor])).as_numpy("logits")[0]

            return await asyncio.gather(*(one(i) for i in range(48)))

    answers = asyncio.run(burst())
    expected = reference.forward(torch.from_numpy(images), tasks)
    for got, want in zip(answers, expected, strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as triton:
        stats = triton.get_inference_statistics("task-0").model_stats[0]
    assert stats.inference_stats.success.count >= 16 and stats.inference_stats.queue.count >= 16
    assert max(b.batch_size for b in stats.batch_stats) > 1
    assert stats.execution_count < stats.inference_count
    samples = {s.name: s.value for m in server.metrics.registry.collect() for s in m.samples}
    # More task-rows than batches: some batch held several tasks.
    assert samples["e2vpt_batch_tasks_sum"] > samples["e2vpt_batch_tasks_count"]


def test_bad_inputs_fail_alone_and_server_keeps_serving(server, client, packages):
    size = packages[0].preprocess.input_size
    good = normalized_images(1, size, seed=8)
    cases = []
    cases.append((grpc.StatusCode.NOT_FOUND, "unknown task 'missing'", "missing", [fp32_input(good)]))
    wrong_dtype = grpcclient.InferInput("input", [1, 3, size, size], "FP64")
    wrong_dtype.set_data_from_numpy(good.astype(np.float64))
    cases.append(
        (grpc.StatusCode.INVALID_ARGUMENT, "must have datatype FP32, got FP64", "task-0", [wrong_dtype])
    )
    cases.append(
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"must be FP32 [N, 3, {size}, {size}]",
            "task-0",
            [fp32_input(normalized_images(1, size + 8, seed=1))],
        )
    )
    junk = grpcclient.InferInput("image", [1], "BYTES")
    junk.set_data_from_numpy(np.array([b"definitely not a png"], dtype=np.object_))
    cases.append((grpc.StatusCode.INVALID_ARGUMENT, "image 0: image could not be decoded", "task-0", [junk]))
    nan = good.copy()
    nan[0, 1, 2, 3] = np.nan
    cases.append((grpc.StatusCode.INVALID_ARGUMENT, "contain NaN", "task-0", [fp32_input(nan)]))
    cases.append(
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "batch dimension must be 1..16",
            "task-0",
            [fp32_input(normalized_images(17, size, seed=2))],
        )
    )
    cases.append(
        (grpc.StatusCode.INVALID_ARGUMENT, "send exactly one input", "task-0", [fp32_input(good)] * 2)
    )
    unknown_input = grpcclient.InferInput("pictures", [1], "BYTES")
    unknown_input.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    cases.append((grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'pictures'", "task-0", [unknown_input]))
    for code, fragment, task, inputs in cases:
        expect_error(code, fragment, client.infer, task, inputs)
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown output 'probs'",
        client.infer,
        "task-0",
        [fp32_input(good)],
        outputs=[grpcclient.InferRequestedOutput("probs")],
    )
    # A byte count that does not fit the shape (tritonclient itself refuses to send one).
    request = pb.ModelInferRequest(model_name="task-0")
    request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 8, 8, 3])
    request.raw_input_contents.append(b"\x00" * 100)
    with (
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        pytest.raises(grpc.RpcError) as raw_error,
    ):
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert raw_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 100 bytes; shape [1, 8, 8, 3] of uint8 needs 192" in raw_error.value.details()
    # 3 MiB against a 2 MiB message limit.
    big = np.zeros((1, 3, 512, 512), dtype=np.float32)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("task-0", [fp32_input(big)])
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.infer("task-0", [fp32_input(good)]).as_numpy("logits").shape == (1, packages[0].num_classes)
    stats = client.get_inference_statistics("task-0").model_stats[0]
    assert stats.inference_stats.fail.count >= 8


def test_bad_request_in_a_batch_does_not_fail_the_others(server, packages):
    size = packages[0].preprocess.input_size
    good = normalized_images(1, size, seed=9)
    nan = np.full((1, 3, size, size), np.nan, dtype=np.float32)

    async def burst() -> list[object]:
        async with aioclient.InferenceServerClient(f"127.0.0.1:{server.port}") as triton:

            async def one(index: int) -> object:
                tensor = aioclient.InferInput("input", [1, 3, size, size], "FP32")
                tensor.set_data_from_numpy(nan if index % 3 == 0 else good)
                try:
                    return (await triton.infer(f"task-{index % TASKS}", [tensor])).as_numpy("logits")
                except InferenceServerException as error:
                    return error

            return await asyncio.gather(*(one(i) for i in range(24)))

    answers = asyncio.run(burst())
    for index, answer in enumerate(answers):
        assert isinstance(answer, InferenceServerException) == (index % 3 == 0), (index, answer)


def test_repository_load_replace_unload(client, tiny_backbone, task_dir, packages):
    names = {m.name: m.state for m in client.get_model_repository_index().models}
    assert names == {f"task-{i}": "READY" for i in range(TASKS)}
    extra = write_tasks(tiny_backbone, task_dir, 1, prefix="extra")[0]
    assert not client.is_model_ready("extra-0")
    client.load_model("extra-0")
    assert client.is_model_ready("extra-0")
    client.load_model("extra-0")  # replace: a new version of the same id
    assert client.get_model_metadata("extra-0").versions == ["2"]
    size = extra.preprocess.input_size
    result = client.infer("extra-0", [fp32_input(normalized_images(1, size, seed=10))])
    assert result.get_response().model_version == "2"
    client.unload_model("extra-0")
    assert not client.is_model_ready("extra-0")
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["extra-0"].state == "UNAVAILABLE"
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        "unknown task 'extra-0'",
        client.infer,
        "extra-0",
        [fp32_input(normalized_images(1, size, seed=10))],
    )
    expect_error(grpc.StatusCode.NOT_FOUND, "cannot unload", client.unload_model, "extra-0")
    expect_error(grpc.StatusCode.NOT_FOUND, "no package", client.load_model, "absent")
    assert client.is_model_ready("task-0")


def test_repository_refuses_bad_names_symlinks_and_corrupt_packages(client, task_dir, tmp_path):
    for name in ("../task-0", "a/b", ".hidden", "x" * 200):
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "is not allowed", client.load_model, name)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((task_dir / "task-0.safetensors").read_bytes())
    os.symlink(outside, task_dir / "escape.safetensors")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "outside the task directory", client.load_model, "escape")
    (task_dir / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "truncated or corrupt", client.load_model, "broken")
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["broken"].state == "UNAVAILABLE" and "corrupt" in index["broken"].reason
    assert client.is_model_ready("task-0")
    (task_dir / "broken.safetensors").unlink()
    (task_dir / "escape.safetensors").unlink()


def test_statistics_for_all_tasks_and_memory(client):
    stats = client.get_inference_statistics().model_stats
    assert {s.name for s in stats} >= {f"task-{i}" for i in range(TASKS)}
    for model in stats:
        assert model.memory_usage[0].byte_size > 0
    expect_error(grpc.StatusCode.NOT_FOUND, "unknown task", client.get_inference_statistics, "nope")


def test_prometheus_metrics_endpoint(server, client, packages):
    size = packages[0].preprocess.input_size
    client.infer("task-0", [fp32_input(normalized_images(1, size, seed=11))])
    expect_error(
        grpc.StatusCode.NOT_FOUND, "unknown task", client.infer, "made-up", [fp32_input(np.zeros(1))]
    )
    nan = np.full((1, 3, size, size), np.nan, dtype=np.float32)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "NaN", client.infer, "task-0", [fp32_input(nan)])
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    )
    for name in (
        'e2vpt_requests_total{outcome="success",task="task-0"}',
        "e2vpt_queue_seconds_bucket",
        "e2vpt_compute_seconds_bucket",
        "e2vpt_batch_rows_bucket",
        "e2vpt_tasks_loaded",
        "e2vpt_task_load_seconds_count",
        'e2vpt_request_failures_total{code="INVALID_ARGUMENT"}',
        # Names of tasks that are not loaded share one label, so clients cannot grow the label set.
        'e2vpt_requests_total{outcome="failure",task="_unknown"}',
    ):
        assert name in text, name
    assert "made-up" not in text


def test_model_control_none_refuses_load_and_unload(tiny_backbone, tmp_path):
    write_tasks(tiny_backbone, tmp_path, 1)
    with (
        start_server(tiny_backbone, tmp_path, model_control_mode="none", load_tasks=[]) as running,
        grpcclient.InferenceServerClient(f"127.0.0.1:{running.port}") as triton,
    ):
        assert triton.is_model_ready("task-0")
        expect_error(grpc.StatusCode.UNAVAILABLE, "not allowed", triton.load_model, "task-0")
        expect_error(grpc.StatusCode.UNAVAILABLE, "not allowed", triton.unload_model, "task-0")


def test_tls(tiny_backbone, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tiny_backbone, tasks, 1)
    with start_server(tiny_backbone, tasks, tls_cert=cert, tls_key=key) as running:
        with grpcclient.InferenceServerClient(
            f"localhost:{running.port}", ssl=True, root_certificates=str(cert)
        ) as triton:
            assert triton.is_model_ready("task-0")
        with (
            grpcclient.InferenceServerClient(f"localhost:{running.port}") as plain,
            pytest.raises(InferenceServerException),
        ):
            plain.is_server_live(client_timeout=2)


def test_health_and_metadata_answer_while_a_batch_computes(tiny_backbone, task_dir, packages):
    engine = RecordingEngine(reference_engine(tiny_backbone, []))
    engine.release.clear()
    config = ServerConfig(host="127.0.0.1", port=0, task_dir=task_dir, grace_seconds=5)
    size = packages[0].preprocess.input_size
    with (
        BackgroundServer(InferenceServer(engine, config)) as running,
        grpcclient.InferenceServerClient(f"127.0.0.1:{running.port}") as triton,
    ):
        results = []
        blocked = threading.Thread(
            target=lambda: results.append(triton.infer("task-0", [fp32_input(normalized_images(1, size, 1))]))
        )
        blocked.start()
        assert engine.started.wait(10)
        # The batch stays held until released below: answers within the client timeout are
        # answers while it computes (no wall-clock bound of our own, which a busy machine breaks).
        assert triton.is_server_ready(client_timeout=2)
        assert triton.get_model_metadata("task-0", client_timeout=2).name == "task-0"
        assert not results, "the batch is still held"
        # A request whose deadline passes while it waits is dropped before compute.
        expect_error(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "Deadline",
            triton.infer,
            "task-1",
            [fp32_input(normalized_images(1, size, 2))],
            client_timeout=0.3,
        )
        engine.release.set()
        blocked.join(10)
        assert results[0].as_numpy("logits").shape == (1, packages[0].num_classes)
        assert triton.infer("task-2", [fp32_input(normalized_images(1, size, 3))]).as_numpy("logits").size
        assert [set(batch) for batch in engine.batches] == [{"task-0"}, {"task-2"}]
        dropped = sum(
            s.value
            for m in running.metrics.registry.collect()
            for s in m.samples
            if s.name == "e2vpt_dropped_requests_total"
        )
        assert dropped == 1


def test_demo_report(tiny_backbone, tmp_path, capsys):
    from runtime.cli import run_demo

    write_tasks(tiny_backbone, tmp_path, TASKS)
    assert run_demo(reference_engine(tiny_backbone, []), tmp_path, requests=12) == 0
    report = capsys.readouterr().out
    assert "12 concurrent requests over 3 tasks" in report
    assert "task-0-label-" in report and "server shut down cleanly" in report

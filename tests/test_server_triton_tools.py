"""What Triton's tools do against a real server: perf_analyzer's requests replayed, streaming, shared memory.

perf_analyzer is not installable here, so its requests are replayed with tritonclient: it reads
the metadata and sends every declared input with its declared datatype and shape (the batch
dimension set to its batch size), filled with random data, over gRPC or HTTP.
"""

from __future__ import annotations

import queue
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from runtime.serving.preprocess import pixels_to_input
from tests.server_helpers import normalized_images, reference_engine, start_server, write_tasks


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tool-tasks")


@pytest.fixture(scope="module")
def packages(tiny_backbone, task_dir):
    return write_tasks(tiny_backbone, task_dir, 2)


@pytest.fixture(scope="module")
def server(tiny_backbone, task_dir, packages):
    with start_server(tiny_backbone, task_dir, http_port=0) as running:
        yield running


def perf_analyzer_inputs(metadata: dict, module, batch: int, seed: int) -> tuple[list, dict[str, np.ndarray]]:
    """Every declared input, random data of its declared datatype and shape, as perf_analyzer makes."""
    rng = np.random.default_rng(seed)
    tensors, arrays = [], {}
    for spec in metadata["inputs"]:
        shape = [batch if int(d) == -1 else int(d) for d in spec["shape"]]
        assert all(d > 0 for d in shape), f"perf_analyzer needs --shape for {spec}"
        dtype = triton_to_np_dtype(spec["datatype"])
        array = rng.integers(0, 256, shape).astype(dtype) if dtype == np.uint8 else rng.random(shape, dtype)
        tensor = module.InferInput(spec["name"], shape, spec["datatype"])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
        arrays[spec["name"]] = array
    return tensors, arrays


def test_perf_analyzer_requests_are_answered_over_grpc_and_http(server, tiny_backbone, packages):
    reference = reference_engine(tiny_backbone, packages)
    grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    http_client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        for module, client in ((grpcclient, grpc_client), (httpclient, http_client)):
            metadata = client.get_model_metadata(
                "task-1", **({"as_json": True} if module is grpcclient else {})
            )
            config = client.get_model_config("task-1", **({"as_json": True} if module is grpcclient else {}))
            config = config.get("config", config)
            assert [i["name"] for i in config["input"]] == [i["name"] for i in metadata["inputs"]]
            for batch in (1, 4):
                inputs, arrays = perf_analyzer_inputs(metadata, module, batch, seed=batch)
                result = client.infer("task-1", inputs, outputs=[module.InferRequestedOutput("logits")])
                pixels = torch.from_numpy(arrays["pixels"])
                pre = packages[1].preprocess
                expected = torch.stack(reference.forward(pixels_to_input(pixels, pre), ["task-1"] * batch))
                np.testing.assert_allclose(result.as_numpy("logits"), expected.numpy(), atol=1e-5)
    finally:
        grpc_client.close()
        http_client.close()


@pytest.mark.parametrize("declared", ["input", "image"])
def test_declared_input_option_and_the_others_still_accepted(tiny_backbone, task_dir, packages, declared):
    size = packages[0].preprocess.input_size
    with (
        start_server(tiny_backbone, task_dir, declared_input=declared) as running,
        grpcclient.InferenceServerClient(f"127.0.0.1:{running.port}") as client,
    ):
        metadata = client.get_model_metadata("task-0", as_json=True)
        assert [i["name"] for i in metadata["inputs"]] == [declared]
        if declared == "input":
            inputs, _ = perf_analyzer_inputs(metadata, grpcclient, 2, seed=3)
            assert client.infer("task-0", inputs).as_numpy("logits").shape[0] == 2
        tensor = grpcclient.InferInput("pixels", [1, size + 5, size, 3], "UINT8")
        tensor.set_data_from_numpy(np.zeros((1, size + 5, size, 3), np.uint8))
        assert client.infer("task-0", [tensor]).as_numpy("logits").shape[0] == 1


def test_streaming_answers_every_request_and_reports_errors_on_the_stream(server, packages):
    size = packages[0].preprocess.input_size
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        images = normalized_images(6, size, seed=4)
        for index in range(6):
            tensor = grpcclient.InferInput("input", [1, 3, size, size], "FP32")
            tensor.set_data_from_numpy(images[index : index + 1])
            client.async_stream_infer("task-0", [tensor], request_id=f"s{index}")
        bad = grpcclient.InferInput("input", [1, 3, size + 1, size + 1], "FP32")
        bad.set_data_from_numpy(normalized_images(1, size + 1, seed=5))
        client.async_stream_infer("task-0", [bad], request_id="bad")
        got = [answers.get(timeout=60) for _ in range(7)]
    finally:
        client.stop_stream()
        client.close()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "must be FP32" in errors[0].message()
    ids = {result.get_response().id for result, error in got if error is None}
    assert ids == {f"s{index}" for index in range(6)}
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as check:
        direct = grpcclient.InferInput("input", [1, 3, size, size], "FP32")
        direct.set_data_from_numpy(images[:1])
        expected = check.infer("task-0", [direct]).as_numpy("logits")
    first = next(result for result, error in got if error is None and result.get_response().id == "s0")
    np.testing.assert_allclose(first.as_numpy("logits"), expected, atol=1e-6)


def test_shared_memory_is_refused_at_once_over_grpc(server):
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
        for call, args in (
            (client.get_system_shared_memory_status, ()),
            (client.register_system_shared_memory, ("region", "/key", 64)),
            (client.unregister_system_shared_memory, ()),
            (client.get_cuda_shared_memory_status, ()),
            (client.unregister_cuda_shared_memory, ()),
        ):
            with pytest.raises(InferenceServerException) as caught:
                call(*args, client_timeout=30)
            assert caught.value.status() == f"StatusCode.{grpc.StatusCode.UNIMPLEMENTED.name}"
            assert "shared memory is not supported" in caught.value.message()

"""Triton's queue controls through a real server: priority levels, per-request timeouts, the model
config's dynamic_batching fields, and request parameters refused rather than ignored."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from runtime.serving.server import BackgroundServer, InferenceServer, ServerConfig
from tests.server_helpers import (
    RecordingEngine,
    normalized_images,
    reference_engine,
    start_server,
    write_tasks,
)


def fp32(module, size: int, seed: int):
    tensor = module.InferInput("input", [1, 3, size, size], "FP32")
    tensor.set_data_from_numpy(normalized_images(1, size, seed))
    return tensor


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_higher_priority_requests_are_batched_first(tiny_backbone, tmp_path):
    packages = write_tasks(tiny_backbone, tmp_path, 3)
    size = packages[0].preprocess.input_size
    engine = RecordingEngine(reference_engine(tiny_backbone, []))
    engine.release.clear()
    config = ServerConfig(
        host="127.0.0.1", port=0, task_dir=tmp_path, max_batch_size=1, priority_levels=2, max_queue_delay_ms=0
    )
    with BackgroundServer(InferenceServer(engine, config)) as server, ThreadPoolExecutor(4) as pool:
        address = f"127.0.0.1:{server.port}"

        def infer(task: str, priority: int):
            with grpcclient.InferenceServerClient(address) as client:
                return client.infer(task, [fp32(grpcclient, size, 0)], priority=priority).as_numpy("logits")

        blocker = pool.submit(infer, "task-0", 0)
        assert engine.started.wait(10)
        low = pool.submit(infer, "task-1", 0)  # no priority: the default level, here the lowest (2)
        wait_for(lambda: server.batcher.depth == 1)
        high = pool.submit(infer, "task-2", 1)
        wait_for(lambda: server.batcher.depth == 2)
        engine.release.set()
        for future in (blocker, low, high):
            assert future.result(30).shape[0] == 1
        assert engine.batches == [["task-0"], ["task-2"], ["task-1"]]
        with grpcclient.InferenceServerClient(address) as client:
            batching = client.get_model_config("task-0").config.dynamic_batching
            assert (batching.priority_levels, batching.default_priority_level) == (2, 2)
            assert batching.default_queue_policy.max_queue_size == 256
            expect(
                client.infer,
                "INVALID_ARGUMENT",
                "priority 3 is not a level",
                "task-0",
                [fp32(grpcclient, size, 0)],
                priority=3,
            )


def expect(call, status: str, fragment: str, *args, **kwargs) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    assert status in str(caught.value.status()), caught.value
    assert fragment in caught.value.message(), caught.value.message()


def test_timeouts_and_parameters_over_grpc_and_http(tiny_backbone, tmp_path):
    packages = write_tasks(tiny_backbone, tmp_path, 1)
    size = packages[0].preprocess.input_size
    with start_server(tiny_backbone, tmp_path, http_port=0) as server:
        grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        http_client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            for module, client, codes in (
                (grpcclient, grpc_client, ("DEADLINE_EXCEEDED", "INVALID_ARGUMENT")),
                (httpclient, http_client, ("503", "400")),
            ):
                tensor = fp32(module, size, 1)
                # A generous timeout is honoured as no limit; 1 µs expires before the input is decoded.
                assert client.infer("task-0", [tensor], timeout=10_000_000).as_numpy("logits").shape[0] == 1
                expect(client.infer, codes[0], "deadline passed", "task-0", [tensor], timeout=1)
                expect(
                    client.infer,
                    codes[1],
                    "unknown request parameters 'color'; known: priority, timeout",
                    "task-0",
                    [tensor],
                    parameters={"color": "red"},
                )
                expect(client.infer, codes[1], "priority is not enabled", "task-0", [tensor], priority=1)
                expect(
                    client.infer,
                    codes[1],
                    "sequence batching is not supported",
                    "task-0",
                    [tensor],
                    sequence_id=7,
                )
        finally:
            grpc_client.close()
            http_client.close()
        # Plain HTTP: a malformed timeout is refused, binary_data_output is HTTP's own and accepted.
        body = {
            "inputs": [{"name": "input", "shape": [1, 3, size, size], "datatype": "FP32",
                        "data": normalized_images(1, size, 2).ravel().tolist()}],
            "parameters": {"timeout": -5},
        }  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.http_port}/v2/models/task-0/infer", data=json.dumps(body).encode()
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert (
            caught.value.code == 400
            and "'timeout' must be a non-negative integer" in caught.value.read().decode()
        )
        body["parameters"] = {"binary_data_output": False}
        request = urllib.request.Request(request.full_url, data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert np.array(json.loads(answer.read())["outputs"][0]["data"]).size == packages[0].num_classes

"""The server under pressure and misuse: versions held per request, holds never leaked, admission
refusals, deadlines that skip decoding, a slow load that never stalls the event loop, Triton's
status codes, short messages without server paths, TLS pair checks, idle connections closed.

Concurrency is ordered by events (a gated batch, a gated decoding worker, a gated load) and by
waiting on observable conditions; nothing asserts on the wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import aio as aioclient
from tritonclient.utils import InferenceServerException

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from runtime.cli import add_server_args, server_config
from runtime.core.package import Preprocess
from runtime.core.registry import TaskEntry, TaskRegistry
from runtime.engines.torch_engine import Engine
from runtime.serving.preprocess import pixels_to_input
from runtime.serving.server import BackgroundServer, InferenceServer, ServerConfig
from tests.server_helpers import (
    RecordingEngine,
    make_package,
    normalized_images,
    reference_engine,
    write_tasks,
)


class CountingRegistry:
    """A registry that counts holds not yet released, and can block ``insert`` until told to go on."""

    def __init__(self, registry: TaskRegistry) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self.held = 0
        self.block_adds = False
        self.add_entered = threading.Event()
        self.add_may_finish = threading.Event()

    def hold(self, task_id: str) -> TaskEntry:
        entry = self._registry.hold(task_id)
        with self._lock:
            self.held += 1
        return entry

    def release(self, entry: TaskEntry) -> None:
        self._registry.release(entry)
        with self._lock:
            self.held -= 1

    def insert(self, task, new_version=True, started=None):
        if self.block_adds:
            self.add_entered.set()
            assert self.add_may_finish.wait(30)
        return self._registry.insert(task, new_version, started)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._registry

    def __len__(self) -> int:
        return len(self._registry)

    def __getattr__(self, name: str):
        return getattr(self._registry, name)


def gated_engine(backbone) -> RecordingEngine:
    """A real engine behind a counting registry, whose batches wait for ``engine.release``."""
    engine = RecordingEngine(Engine(backbone, TaskRegistry(backbone)))
    engine.registry = CountingRegistry(engine.registry)
    return engine


@contextmanager
def serve(engine, task_dir: Path, **overrides: object) -> Iterator[InferenceServer]:
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "task_dir": task_dir,
        "model_control_mode": "explicit",
        "load_tasks": ["*"],
        "max_batch_size": 8,
        "max_queue_delay_ms": 1.0,
        "grace_seconds": 5.0,
    }
    settings.update(overrides)
    with BackgroundServer(InferenceServer(engine, ServerConfig(**settings))) as server:
        yield server


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait for an observable state of the server (not a fixed delay); fail naming it."""
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting until {what}"
        time.sleep(0.005)


def metric(server: InferenceServer, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in server.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def fp32_input(array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array.astype(np.float32))
    return tensor


def pixels_input(pixels: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    return tensor


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``call`` on a thread; its result or exception lands in the returned list."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def status_of(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def test_a_task_replaced_while_its_request_waits_answers_with_the_admitted_version(tiny_backbone, tmp_path):
    """Preprocessing, compute, labels and version all come from the version the request was admitted
    under, even when the task is replaced (new prompts AND new mean/std) before its batch runs."""
    size = tiny_backbone.spec.img_size
    write_tasks(tiny_backbone, tmp_path, 1, prefix="blocker")
    first = make_package(tiny_backbone, "swap", seed=1, classes=4)
    second = dataclasses.replace(
        make_package(tiny_backbone, "swap", seed=2, classes=4),
        preprocess=Preprocess(input_size=size, mean=(0.1, 0.2, 0.3), std=(0.9, 0.8, 0.7)),
    )
    first.save(tmp_path / "swap.safetensors")
    pixels = np.random.default_rng(3).integers(0, 256, (1, size + 6, size + 2, 3), dtype=np.uint8)
    expected = {}
    for version, package in ((1, first), (2, second)):
        images = pixels_to_input(torch.from_numpy(pixels), package.preprocess)
        expected[version] = reference_engine(tiny_backbone, [package]).forward(images, ["swap"])[0].numpy()
    assert not np.allclose(expected[1], expected[2], atol=1e-3), "the versions must answer differently"

    engine = gated_engine(tiny_backbone)
    engine.release.clear()
    with (
        serve(engine, tmp_path) as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client,
    ):
        blocker, _ = in_thread(lambda: client.infer("blocker-0", [fp32_input(normalized_images(1, size, 0))]))
        assert engine.started.wait(10)
        waiting, answers = in_thread(lambda: client.infer("swap", [pixels_input(pixels)]))
        wait_until(lambda: server.batcher.depth == 1, "the request is queued (admitted and decoded)")
        second.save(tmp_path / "swap.safetensors")
        client.load_model("swap")
        assert client.get_model_metadata("swap").versions == ["2"]
        engine.release.set()
        blocker.join(10)
        waiting.join(10)
        answer = answers[0]
        assert isinstance(answer, grpcclient.InferResult), answer
        assert answer.get_response().model_version == "1"
        np.testing.assert_allclose(answer.as_numpy("logits")[0], expected[1], atol=1e-5)
        fresh = client.infer("swap", [pixels_input(pixels)])
        assert fresh.get_response().model_version == "2"
        np.testing.assert_allclose(fresh.as_numpy("logits")[0], expected[2], atol=1e-5)
        wait_until(lambda: engine.registry.held == 0, "every hold is released")


def test_holds_are_released_on_success_error_deadline_and_cancellation(tiny_backbone, tmp_path):
    size = tiny_backbone.spec.img_size
    write_tasks(tiny_backbone, tmp_path, 2)
    engine = gated_engine(tiny_backbone)
    good = normalized_images(1, size, 1)
    nan = np.full((1, 3, size, size), np.nan, dtype=np.float32)
    with (
        serve(engine, tmp_path, preprocess_threads=1) as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client,
    ):
        registry = engine.registry
        client.infer("task-0", [fp32_input(good)])  # success
        assert (
            status_of(lambda: client.infer("task-0", [fp32_input(nan)]))[0] == "StatusCode.INVALID_ARGUMENT"
        )
        assert status_of(lambda: client.infer("task-0", [fp32_input(good)], model_version="9"))[0] == (
            "StatusCode.NOT_FOUND"
        )
        assert registry.held == 0

        # Deadline and cancellation while queued behind a held batch.
        engine.release.clear()
        engine.started.clear()
        blocker, _ = in_thread(lambda: client.infer("task-0", [fp32_input(good)]))
        assert engine.started.wait(10)
        deadline = status_of(lambda: client.infer("task-1", [fp32_input(good)], client_timeout=0.5))
        assert deadline[0] == "StatusCode.DEADLINE_EXCEEDED"

        async def cancel_while_queued() -> None:
            async with aioclient.InferenceServerClient(f"127.0.0.1:{server.port}") as aclient:
                queued = server.batcher.depth
                call = asyncio.ensure_future(aclient.infer("task-1", [fp32_input(good)]))
                while server.batcher.depth == queued:  # admitted, decoded and queued: it holds its task
                    await asyncio.sleep(0.005)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call

        asyncio.run(cancel_while_queued())
        wait_until(lambda: registry.held == 1, "only the computing request holds its task")

        # Cancelled while its input is being decoded: the decoding worker's hold is given back.
        decoding, may_finish = threading.Event(), threading.Event()
        service = server.service
        decode = service._model_input

        def slow_decode(*args):
            decoding.set()
            assert may_finish.wait(30)
            return decode(*args)

        service._model_input = slow_decode
        answered = threading.Event()
        call = client.async_infer("task-1", [fp32_input(good)], callback=lambda result, error: answered.set())
        assert decoding.wait(10)
        assert registry.held == 2  # the decoding request holds task-1
        call.cancel()
        assert answered.wait(10)
        may_finish.set()
        wait_until(lambda: registry.held == 1, "the abandoned decoded request gives its hold back")
        service._model_input = decode

        engine.release.set()
        blocker.join(10)
        wait_until(lambda: registry.held == 0, "every hold is released")
        assert metric(server, "e2vpt_request_failures_total", code="DEADLINE_EXCEEDED") == 1
        wait_until(
            lambda: metric(server, "e2vpt_request_failures_total", code="CANCELLED") == 2,
            "both cancellations are counted",
        )
        assert engine.batches[-1] == ["task-0"], "no dropped request reached a batch"


def test_admission_refuses_at_once_when_in_flight_or_decoding_is_full(tiny_backbone, tmp_path):
    size = tiny_backbone.spec.img_size
    write_tasks(tiny_backbone, tmp_path, 1)
    engine = gated_engine(tiny_backbone)
    good = normalized_images(1, size, 1)
    with (
        serve(engine, tmp_path, max_inflight=2, preprocess_threads=1, max_preprocess_backlog=2) as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client,
    ):
        engine.release.clear()
        computing, _ = in_thread(lambda: client.infer("task-0", [fp32_input(good)]))
        assert engine.started.wait(10)
        queued, _ = in_thread(lambda: client.infer("task-0", [fp32_input(good)]))
        wait_until(lambda: server.admission.count == 2, "two requests are in flight")
        # Refused while the batch is still held: the refusal waits for nothing.
        status, message = status_of(lambda: client.infer("task-0", [fp32_input(good)]))
        assert status == "StatusCode.UNAVAILABLE" and "requests in flight" in message
        assert client.is_server_live() and client.is_model_ready("task-0")
        engine.release.set()
        computing.join(10)
        queued.join(10)

        # A full decoding backlog (its only worker busy, one job waiting) refuses before decoding.
        gate = threading.Event()
        busy = [server.preprocess_pool.submit(gate.wait, 30) for _ in range(2)]
        status, message = status_of(lambda: client.infer("task-0", [fp32_input(good)]))
        assert status == "StatusCode.UNAVAILABLE" and "backlog is full" in message
        gate.set()
        for job in busy:
            job.result(10)
        assert client.infer("task-0", [fp32_input(good)]).as_numpy("logits").shape[0] == 1
        assert metric(server, "e2vpt_request_failures_total", code="UNAVAILABLE") == 2


def test_a_request_past_its_deadline_is_never_decoded(tiny_backbone, tmp_path):
    size = tiny_backbone.spec.img_size
    write_tasks(tiny_backbone, tmp_path, 1)
    with (
        serve(Engine(tiny_backbone, TaskRegistry(tiny_backbone)), tmp_path, preprocess_threads=1) as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client,
    ):
        gate = threading.Event()
        busy = server.preprocess_pool.submit(gate.wait, 30)  # the only decoding worker is busy
        status, _ = status_of(
            lambda: client.infer("task-0", [fp32_input(normalized_images(1, size, 1))], client_timeout=0.3)
        )
        assert status == "StatusCode.DEADLINE_EXCEEDED"
        wait_until(
            lambda: metric(server, "e2vpt_dropped_requests_total", reason="deadline") == 1,
            "the expired request is dropped before decoding",
        )
        gate.set()
        busy.result(10)
        assert metric(server, "e2vpt_preprocess_seconds_count") == 0, "nothing was decoded"
        assert metric(server, "e2vpt_request_failures_total", code="DEADLINE_EXCEEDED") == 1


def test_a_slow_load_never_stalls_the_event_loop(tiny_backbone, tmp_path):
    """Bound: no call on the event loop waits for a load, an unload or the task directory (they
    run on helper threads); ServerLive, metadata, the index and inference answer while a load is
    blocked, and an unload requested meanwhile waits off the loop."""
    size = tiny_backbone.spec.img_size
    write_tasks(tiny_backbone, tmp_path, 2)
    engine = gated_engine(tiny_backbone)
    registry = engine.registry
    with (
        serve(engine, tmp_path) as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client,
    ):
        make_package(tiny_backbone, "slow", seed=9).save(tmp_path / "slow.safetensors")
        registry.block_adds = True
        loading, loaded = in_thread(lambda: client.load_model("slow"))
        assert registry.add_entered.wait(10)
        unloading, unloaded = in_thread(lambda: client.unload_model("task-1"))
        assert client.is_server_live(client_timeout=5)
        assert client.is_model_ready("task-0", client_timeout=5)
        assert client.get_model_metadata("task-0", client_timeout=5).name == "task-0"
        index = {m.name: m.state for m in client.get_model_repository_index(client_timeout=5).models}
        assert index["task-0"] == "READY" and index["slow"] == "UNAVAILABLE"
        result = client.infer("task-0", [fp32_input(normalized_images(1, size, 1))], client_timeout=5)
        assert result.as_numpy("logits").shape[0] == 1
        assert loading.is_alive() and not registry.add_may_finish.is_set(), "the load is still blocked"
        registry.add_may_finish.set()
        loading.join(10)
        unloading.join(10)
        assert loaded == [None] and unloaded == [None]
        assert client.is_model_ready("slow") and not client.is_model_ready("task-1")


def test_status_codes_short_messages_and_no_server_paths(tiny_backbone, tmp_path):
    size = tiny_backbone.spec.img_size
    write_tasks(tiny_backbone, tmp_path, 1)
    engine = gated_engine(tiny_backbone)
    with (
        serve(engine, tmp_path) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def raw_infer(name: str, datatype: str, shape: list[int], data: bytes, model: str = "task-0"):
            request = pb.ModelInferRequest(model_name=model)
            request.inputs.add(name=name, datatype=datatype, shape=shape)
            request.raw_input_contents.append(data)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request)
            return caught.value.code(), caught.value.details()

        # Dimensions whose product overflows int64, or that no input form allows.
        for name, datatype, shape in (
            ("pixels", "UINT8", [1, 2**40, 2**40, 3]),
            ("input", "FP32", [1, 3, 2**62, 2**62]),
            ("input", "FP32", [2**63 - 1, 3, size, size]),
            ("pixels", "UINT8", [1, 1, 1, 1, 3]),
        ):
            code, details = raw_infer(name, datatype, shape, b"\x00" * 12)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (shape, details)
        # A 100 KB task name is cut in the answer, which still arrives whole.
        code, details = raw_infer(
            "input", "FP32", [1, 3, size, size], b"\x00" * (12 * size * size), "x" * 100_000
        )
        assert code == grpc.StatusCode.NOT_FOUND and len(details) < 300 and "xxxx" in details
        # Allocation failure while computing: RESOURCE_EXHAUSTED, and the server goes on.
        forward = engine.forward_entries

        def out_of_memory(*args):
            raise MemoryError

        engine.forward_entries = out_of_memory
        status, message = status_of(
            lambda: client.infer("task-0", [fp32_input(normalized_images(1, size, 1))])
        )
        assert status == "StatusCode.RESOURCE_EXHAUSTED" and "memory" in message
        engine.forward_entries = forward
        assert client.infer("task-0", [fp32_input(normalized_images(1, size, 1))]).as_numpy("logits").size
        # A corrupt package: the error and the index name the file, never the directory.
        (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
        status, message = status_of(lambda: client.load_model("broken"))
        assert status == "StatusCode.INVALID_ARGUMENT" and "broken" in message
        reasons = [m.reason for m in client.get_model_repository_index().models]
        for text in [message, *reasons]:
            assert str(tmp_path) not in text, text


def test_tls_key_that_does_not_match_its_certificate_is_named(tiny_backbone, tmp_path):
    def pem(name: str) -> tuple[Path, Path]:
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
            check=True, capture_output=True,
        )  # fmt: skip
        return key, cert

    key, _ = pem("one")
    _, other_cert = pem("two")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    with (
        pytest.raises(ValueError, match=r"TLS key one\.key does not match certificate two\.pem"),
        serve(Engine(tiny_backbone, TaskRegistry(tiny_backbone)), tasks, tls_cert=other_cert, tls_key=key),
    ):
        pass


def test_idle_connections_are_closed_after_the_idle_timeout(tiny_backbone, tmp_path):
    with (
        serve(
            Engine(tiny_backbone, TaskRegistry(tiny_backbone)), tmp_path, idle_timeout_seconds=0.5
        ) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        ready, closed = threading.Event(), threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state == grpc.ChannelConnectivity.READY:
                ready.set()
            elif ready.is_set() and state == grpc.ChannelConnectivity.IDLE:
                closed.set()  # the server's GOAWAY took the connected channel back to idle

        channel.subscribe(watch)
        assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest()).live
        assert closed.wait(20), "the server kept an idle connection open"
        channel.unsubscribe(watch)


def test_metrics_port_zero_means_a_free_port_in_the_cli_and_the_server(tiny_backbone, tmp_path):
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    parser.add_argument("--threads", type=int)  # a backbone option that server_config reads too
    assert server_config(parser.parse_args(["--task-dir", "t", "--metrics-port", "0"])).metrics_port == 0
    assert server_config(parser.parse_args(["--task-dir", "t", "--no-metrics"])).metrics_port is None
    with serve(Engine(tiny_backbone, TaskRegistry(tiny_backbone)), tmp_path, metrics_port=0) as server:
        assert server.metrics_port and server.metrics_port > 0
    with serve(Engine(tiny_backbone, TaskRegistry(tiny_backbone)), tmp_path) as server:
        assert server.metrics_port is None

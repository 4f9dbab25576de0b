"""Triton's accounting through a real server: one held batch, then one mixed batch of two tasks.

Every request of a batch is charged the batch's whole compute time, ``batch_stats`` is keyed by
the task's own rows in the batch, ``execution_count`` counts the batches a task took part in, and
the Prometheus endpoint carries Triton's metric names and labels (and serves only /metrics).
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from runtime.serving.server import BackgroundServer, InferenceServer, ServerConfig
from tests.server_helpers import RecordingEngine, normalized_images, reference_engine, write_tasks


def wait_for(condition, timeout: float = 30.0) -> None:
    """Until ``condition()`` holds (bounded): the test waits for server state, not for time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def sample(text: str, name: str, task: str) -> float:
    match = re.search(rf'^{name}{{model="{task}",version="1"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} for {task} not in the metrics"
    return float(match.group(1))


def test_every_request_is_charged_its_batch_and_metrics_use_tritons_names(tiny_backbone, tmp_path):
    packages = write_tasks(tiny_backbone, tmp_path, 2)
    size = packages[0].preprocess.input_size
    engine = RecordingEngine(reference_engine(tiny_backbone, []))
    engine.release.clear()
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        task_dir=tmp_path,
        max_batch_size=16,
        metrics_port=0,
        metrics_host="127.0.0.1",
    )
    with (
        BackgroundServer(InferenceServer(engine, config)) as server,
        ThreadPoolExecutor(6) as pool,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client,
    ):

        def infer(task: str, rows: int, seed: int):
            tensor = grpcclient.InferInput("input", [rows, 3, size, size], "FP32")
            tensor.set_data_from_numpy(normalized_images(rows, size, seed))
            with grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as own:
                return own.infer(task, [tensor]).as_numpy("logits")

        first = pool.submit(infer, "task-0", 1, 0)
        assert engine.started.wait(10)
        # While the first batch is held, 2 requests (3 rows) of task-0 and 3 of task-1 queue up.
        later = [pool.submit(infer, "task-0", rows, seed) for seed, rows in ((1, 1), (2, 2))]
        later += [pool.submit(infer, "task-1", 1, seed) for seed in (3, 4, 5)]
        wait_for(lambda: server.batcher.depth == 5)
        _, text = scrape(server.metrics_port)
        assert sample(text, "nv_inference_pending_request_count", "task-0") == 2
        assert sample(text, "nv_inference_pending_request_count", "task-1") == 3
        engine.release.set()
        assert first.result(30).shape == (1, packages[0].num_classes)
        assert [f.result(30).shape[0] for f in later] == [1, 2, 1, 1, 1]
        assert [sorted(set(batch)) for batch in engine.batches] == [["task-0"], ["task-0", "task-1"]]
        stats = {s.name: s for s in client.get_inference_statistics().model_stats}

        zero, one = stats["task-0"], stats["task-1"]
        assert (zero.execution_count, zero.inference_count) == (2, 4)
        assert (one.execution_count, one.inference_count) == (1, 3)
        # Keyed by the task's own rows: task-0 had 1 row, then 3 rows beside task-1's 3.
        assert {b.batch_size: b.compute_infer.count for b in zero.batch_stats} == {1: 1, 3: 1}
        assert {b.batch_size: b.compute_infer.count for b in one.batch_stats} == {3: 1}
        mixed = one.batch_stats[0].compute_infer.ns
        assert next(b for b in zero.batch_stats if b.batch_size == 3).compute_infer.ns == mixed
        alone = next(b for b in zero.batch_stats if b.batch_size == 1).compute_infer.ns
        # Every request is charged its batch's whole time.
        assert (one.inference_stats.compute_infer.count, one.inference_stats.compute_infer.ns) == (
            3,
            3 * mixed,
        )
        assert (zero.inference_stats.compute_infer.count, zero.inference_stats.compute_infer.ns) == (
            3,
            alone + 2 * mixed,
        )
        for phase in ("compute_input", "compute_output"):
            assert getattr(one.inference_stats, phase).ns == 3 * getattr(one.batch_stats[0], phase).ns

        status, text = scrape(server.metrics_port)
        assert status == 200
        assert sample(text, "nv_inference_request_success", "task-1") == 3
        assert sample(text, "nv_inference_count", "task-0") == 4
        assert sample(text, "nv_inference_exec_count", "task-0") == 2
        assert sample(text, "nv_inference_exec_count", "task-1") == 1
        assert sample(text, "nv_inference_pending_request_count", "task-1") == 0
        assert abs(sample(text, "nv_inference_compute_infer_duration_us", "task-1") - 3 * mixed / 1e3) < 1
        assert sample(text, "nv_inference_queue_duration_us", "task-1") > 0
        assert sample(text, "nv_inference_request_duration_us", "task-1") > 0
        for gauge in ("nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes"):
            assert re.search(rf"^{gauge} \S+$", text, re.MULTILINE), gauge
        assert "nv_inference_count_total" not in text  # Triton's exact names, no suffix
        assert "e2vpt_requests_total" in text  # ours beside them
        assert scrape(server.metrics_port, "/v2/health/ready")[0] == 404
        assert scrape(server.metrics_port, "/")[0] == 404
        assert server.metrics._http is not None and server.metrics._http.server_address[0] == "127.0.0.1"


def test_a_failed_request_counts_for_its_model_and_version(tiny_backbone, tmp_path):
    packages = write_tasks(tiny_backbone, tmp_path, 1)
    size = packages[0].preprocess.input_size
    config = ServerConfig(
        host="127.0.0.1", port=0, task_dir=tmp_path, metrics_port=0, metrics_host="127.0.0.1"
    )
    with (
        BackgroundServer(InferenceServer(reference_engine(tiny_backbone, []), config)) as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client,
    ):
        bad = grpcclient.InferInput("input", [1, 3, size + 1, size + 1], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, size + 1, size + 1), np.float32))
        for task in ("task-0", "nope"):
            with pytest.raises(InferenceServerException):
                client.infer(task, [bad])
        _, text = scrape(server.metrics_port)
    assert sample(text, "nv_inference_request_failure", "task-0") == 1
    assert 'model="nope"' not in text and 'model="_unknown"' not in text  # no Triton series for it

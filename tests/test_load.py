"""Bounded load test: thousands of requests, 32 concurrent, several tasks, one task churned meanwhile.

Expectations: zero unexpected errors (the churned task may answer NOT_FOUND only while it is
unloaded), every answer equal to the in-process forward of its row and task version, and the
server's resident memory steady between the first and the last part of the run.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import aio as aioclient
from tritonclient.utils import InferenceServerException

from benchmarks.common import rss_bytes
from tests.server_helpers import make_package, normalized_images, reference_engine, start_server, write_tasks

REQUESTS = 2400
CONCURRENCY = 32
STEADY_TASKS = 4
CHURNED = "churn"


@pytest.mark.slow
def test_load_with_task_churn(tiny_backbone, tmp_path):
    packages = write_tasks(tiny_backbone, tmp_path, STEADY_TASKS)
    variants = [make_package(tiny_backbone, CHURNED, seed=900 + v, classes=4) for v in range(2)]
    variants[0].save(tmp_path / f"{CHURNED}.safetensors")
    size = tiny_backbone.spec.img_size
    pool = normalized_images(16, size, seed=42)
    tasks = [p.task_id for p in packages] + [CHURNED]
    # Expected logits per (task or churn variant, pool row), from in-process forwards.
    expected: dict[tuple[str, int], np.ndarray] = {}
    steady = reference_engine(tiny_backbone, packages)
    for package in packages:
        for row, logits in enumerate(steady.forward(torch.from_numpy(pool), [package.task_id] * len(pool))):
            expected[(package.task_id, row)] = logits.numpy()
    for index, variant in enumerate(variants):
        engine = reference_engine(tiny_backbone, [variant])
        for row, logits in enumerate(engine.forward(torch.from_numpy(pool), [CHURNED] * len(pool))):
            expected[(f"{CHURNED}#{index}", row)] = logits.numpy()

    with start_server(
        tiny_backbone, tmp_path, max_batch_size=32, max_queue_delay_ms=2, max_queue_size=512
    ) as server:
        url = f"127.0.0.1:{server.port}"
        variant_of_version = {"1": 0}
        traffic_done = threading.Event()

        def churn() -> None:
            # Paced by the end of the traffic rather than by sleeps: each pause ends as soon as it is over.
            with grpcclient.InferenceServerClient(url) as control:
                turn = 0
                while not traffic_done.wait(0.05):
                    control.unload_model(CHURNED)
                    traffic_done.wait(0.05)
                    turn += 1
                    variants[turn % 2].save(tmp_path / f"{CHURNED}.safetensors")
                    control.load_model(CHURNED)
                    version = control.get_model_metadata(CHURNED).versions[0]
                    variant_of_version[version] = turn % 2

        answers: list[tuple[str, int, str, np.ndarray]] = []
        not_found: list[str] = []
        unexpected: list[str] = []
        memory: dict[str, int] = {}

        async def drive() -> None:
            rng = random.Random(0)
            plan = [(rng.choice(tasks), rng.randrange(len(pool)), rng.randint(1, 3)) for _ in range(REQUESTS)]
            queue: asyncio.Queue = asyncio.Queue()
            for index, item in enumerate(plan):
                queue.put_nowait((index, *item))
            async with aioclient.InferenceServerClient(url) as client:

                async def worker() -> None:
                    while not queue.empty():
                        index, task, row, count = queue.get_nowait()
                        rows = [(row + k) % len(pool) for k in range(count)]
                        tensor = aioclient.InferInput("input", [count, 3, size, size], "FP32")
                        tensor.set_data_from_numpy(pool[rows])
                        try:
                            result = await client.infer(task, [tensor])
                        except InferenceServerException as error:
                            if task == CHURNED and error.status() == "StatusCode.NOT_FOUND":
                                not_found.append(error.message())
                            else:
                                unexpected.append(f"{task}: {error.status()} {error.message()}")
                            continue
                        version = result.get_response().model_version
                        for k, logits in zip(rows, result.as_numpy("logits"), strict=True):
                            answers.append((task, k, version, logits))
                        if index == REQUESTS // 4:
                            memory["warm"] = rss_bytes()

                await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

        churner = threading.Thread(target=churn)
        churner.start()
        started = time.perf_counter()
        try:
            asyncio.run(drive())
        finally:
            traffic_done.set()
            churner.join()
        elapsed = time.perf_counter() - started
        memory["end"] = rss_bytes()
        with grpcclient.InferenceServerClient(url) as client:
            stats = {s.name: s for s in client.get_inference_statistics().model_stats}

    assert not unexpected, unexpected[:5]
    assert len(answers) >= REQUESTS  # at least one row per answered request
    for task, row, version, logits in answers:
        key = (task, row) if task != CHURNED else (f"{CHURNED}#{variant_of_version[version]}", row)
        np.testing.assert_allclose(logits, expected[key], atol=1e-5, err_msg=f"{task} v{version} row {row}")
    assert all("unknown task 'churn'" in message for message in not_found)
    assert len(variant_of_version) > 2, "the churned task should have been reloaded several times"
    mixed = [s for s in stats.values() if max((b.batch_size for b in s.batch_stats), default=0) > 1]
    assert len(mixed) >= STEADY_TASKS
    growth = memory["end"] - memory["warm"]
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over the run"
    print(
        f"{REQUESTS} requests in {elapsed:.1f} s, {len(not_found)} NOT_FOUND while churned, "
        f"RSS +{growth / 2**20:.1f} MiB"
    )

"""Ray Serve scale-out: two replicas of a tiny backbone behind Ray's gRPC proxy, queried with tritonclient.

One Ray instance (2 CPUs) and one application serve the whole module; the replica-kill test runs last.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import aio as aioclient
from tritonclient.utils import InferenceServerException

from runtime.core.backbone import Backbone
from runtime.core.package import TaskPackage
from runtime.engines.torch_engine import Engine
from tests.server_helpers import free_port, normalized_images, reference_engine, write_tasks

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from runtime.scaleout.desired import RECORD_NAME, read_record  # noqa: E402  (needs ray installed)
from runtime.scaleout.proxy_hook import replica_lost  # noqa: E402
from runtime.scaleout.ray_app import APP_NAME, DEPLOYMENT_NAME, serve_args, start  # noqa: E402

REPLICAS = 2
# Statuses a client may retry on: the request was not answered and says so.
RETRIABLE = {"StatusCode.UNAVAILABLE"}
WAIT_SECONDS = 60.0
ROOT = Path(__file__).resolve().parents[1]
# Ray's workers import the project (and the tests' pickled specs) from here.
PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])


@dataclass
class RayApp:
    url: str
    task_dir: Path
    packages: list[TaskPackage]
    reference: Engine
    handle: Any


def wait_for(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Backbone) -> Iterator[RayApp]:
    root = tmp_path_factory.mktemp("ray")
    task_dir = root / "tasks"
    task_dir.mkdir()
    packages = write_tasks(tiny_backbone, task_dir, 3)
    weights = tiny_backbone.save(root / "backbone.safetensors")
    port = free_port()
    args = serve_args(
        [
            "--weights", str(weights), "--task-dir", str(task_dir), "--host", "127.0.0.1",
            "--port", str(port), "--http-port", str(free_port()), "--model-control-mode", "explicit",
            "--load-task", "task-0", "--load-task", "task-1", "--max-batch-size", "16",
            "--max-queue-delay-ms", "2", "--cluster", "ray", "--replicas", str(REPLICAS),
            "--reconcile-seconds", "0.2",
        ]
    )  # fmt: skip
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        },
    )
    try:
        handle = start(args)
        yield RayApp(
            f"127.0.0.1:{port}", task_dir, packages, reference_engine(tiny_backbone, packages), handle
        )
    finally:
        serve.shutdown()
        ray.shutdown()


def reports(app: RayApp, task_id: str, replicas: int = REPLICAS) -> dict[str, dict[str, Any]]:
    """One report per replica, asked through the application's handle until each has answered."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + WAIT_SECONDS
    while len(seen) < replicas:
        assert time.monotonic() < deadline, f"only replicas {sorted(seen)} answered"
        report = app.handle.replica_report.remote(task_id).result(timeout_s=WAIT_SECONDS)
        seen[report["replica"]] = report
    return seen


def expected(app: RayApp, images: np.ndarray, task_id: str) -> np.ndarray:
    return torch.stack(app.reference.forward(torch.from_numpy(images), [task_id] * len(images))).numpy()


async def infer(client: aioclient.InferenceServerClient, task_id: str, images: np.ndarray) -> np.ndarray:
    tensor = aioclient.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = await client.infer(task_id, [tensor], client_timeout=WAIT_SECONDS)
    return result.as_numpy("logits")


def test_tritonclient_through_the_proxy_matches_the_engine_for_mixed_tasks(app: RayApp) -> None:
    client = grpcclient.InferenceServerClient(app.url)  # no 'application' metadata: one app
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("task-0") and not client.is_model_ready("task-2")
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {"task-0": "READY", "task-1": "READY", "task-2": "UNAVAILABLE"}
    assert client.get_model_metadata("task-1").outputs[0].shape == [-1, app.packages[1].num_classes]
    with pytest.raises(InferenceServerException, match="unknown task") as error:
        client.get_model_metadata("absent")
    assert error.value.status() == "StatusCode.NOT_FOUND"

    requests = [(f"task-{i % 2}", normalized_images(1 + i % 3, 32, seed=i)) for i in range(12)]

    async def burst() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(app.url) as aclient:
            return await asyncio.gather(*(infer(aclient, task, images) for task, images in requests))

    for (task, images), logits in zip(requests, asyncio.run(burst()), strict=True):
        np.testing.assert_allclose(logits, expected(app, images, task), rtol=1e-5, atol=1e-5)


def test_a_load_through_the_proxy_is_served_by_every_replica(app: RayApp) -> None:
    client = grpcclient.InferenceServerClient(app.url)
    client.load_model("task-2")  # reaches one replica
    assert read_record(app.task_dir)["task-2"] > 0  # type: ignore[index]
    wait_for(lambda: all(r["ready"] for r in reports(app, "task-2").values()), "every replica to load task-2")

    images = normalized_images(2, 32, seed=99)

    async def burst() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(app.url) as aclient:
            return await asyncio.gather(*(infer(aclient, "task-2", images) for _ in range(16)))

    # Ray's router picks the replica; a burst may land on one replica alone (it did in 2 of 7 runs),
    # so bursts go on, a bounded number of times, until every replica has served the task.
    for _ in range(8):
        for logits in asyncio.run(burst()):
            np.testing.assert_allclose(logits, expected(app, images, "task-2"), rtol=1e-5, atol=1e-5)
        served = reports(app, "task-2")
        if all(r["inference_count"] > 0 for r in served.values()):
            break
    assert len(served) == REPLICAS and all(r["inference_count"] > 0 for r in served.values()), served

    client.unload_model("task-2")
    wait_for(lambda: not any(r["ready"] for r in reports(app, "task-2").values()), "every replica to unload")
    assert "task-2" not in read_record(app.task_dir)  # type: ignore[operator]
    assert (app.task_dir / RECORD_NAME).is_file()


def test_the_proxy_turns_a_lost_replica_into_unavailable_only() -> None:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    unreachable = ActorUnavailableError("Actor is unavailable.", bytes(16))  # as the gRPC transport says it
    for lost in (ActorDiedError(), RayActorError(), unreachable):
        assert replica_lost(grpc.StatusCode.INTERNAL, str(lost))
    assert not replica_lost(grpc.StatusCode.INTERNAL, "internal error: ValueError")
    assert not replica_lost(grpc.StatusCode.NOT_FOUND, "the actor died")


def test_a_killed_replica_is_replaced_and_no_request_is_lost_silently(app: RayApp) -> None:
    before = reports(app, "task-0")
    victim = sorted(before)[0]
    images = normalized_images(2, 32, seed=5)
    want = expected(app, images, "task-0")
    outcomes: list[str] = []

    async def load() -> None:
        half = asyncio.Event()

        async with aioclient.InferenceServerClient(app.url) as aclient:

            async def one() -> None:
                try:
                    logits = await infer(aclient, "task-0", images)
                    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
                    outcomes.append("ok")
                except InferenceServerException as error:
                    outcomes.append(str(error.status()))
                if len(outcomes) == 40:
                    half.set()

            async def kill_at_half() -> None:
                await half.wait()
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

            async def worker(count: int) -> None:
                for _ in range(count):
                    await one()

            await asyncio.gather(kill_at_half(), *(worker(20) for _ in range(8)))

    asyncio.run(load())
    assert len(outcomes) == 160
    failures = [status for status in outcomes if status != "ok"]
    assert set(failures) <= RETRIABLE, failures
    assert outcomes.count("ok") >= 120

    def replaced() -> bool:
        status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
        return status.replica_states.get("RUNNING", 0) == REPLICAS

    wait_for(replaced, "Ray to replace the killed replica")
    after = reports(app, "task-0")
    assert victim not in after and all(r["ready"] for r in after.values())
    client = grpcclient.InferenceServerClient(app.url)
    assert client.is_server_ready()

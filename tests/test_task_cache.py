"""The tiered task cache through a real server on loopback and tritonclient: registered tasks answered
on demand, eviction under a resident budget, pinning, and a corrupt package among thousands."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from runtime import Backbone, TaskRegistry
from runtime.core.package import PackageError, TaskPackage, package_from_bytes
from runtime.serving.errors import ServingError, Status
from runtime.serving.inference import load_pin
from runtime.serving.package_source import TaskNotFoundError
from runtime.serving.task_cache import CacheBudget
from runtime.serving.task_store import TaskStore
from tests.helpers import random_package
from tests.server_helpers import normalized_images, reference_engine, start_server, write_tasks


def infer(client: grpcclient.InferenceServerClient, task_id: str, images: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return client.infer(task_id, [tensor]).as_numpy("logits").copy()


def expected_logits(
    backbone: Backbone, packages: list[TaskPackage], images: np.ndarray
) -> dict[str, torch.Tensor]:
    engine = reference_engine(backbone, packages)
    return {
        package.task_id: torch.stack(
            engine.forward(torch.from_numpy(images), [package.task_id] * len(images))
        )
        for package in packages
    }


def test_registered_tasks_load_on_demand_and_answer_like_the_engine(
    tiny_backbone: Backbone, tmp_path: Path
) -> None:
    packages = write_tasks(tiny_backbone, tmp_path, 8)
    images = normalized_images(2, tiny_backbone.spec.img_size, seed=1)
    expected = expected_logits(tiny_backbone, packages, images)
    with start_server(
        tiny_backbone, tmp_path, model_control_mode="none", max_resident_tasks=3, host_cache_mb=0.0
    ) as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.is_server_ready() and len(server.engine.registry) == 0  # registered, none resident
        index = {row["name"]: row for row in client.get_model_repository_index(as_json=True)["models"]}
        assert {row["state"] for row in index.values()} == {"READY"}
        assert index["task-5"]["reason"].startswith("on disk")
        for round_ in range(2):  # the second round loads every task again: all were evicted meanwhile
            for package in packages:
                got = torch.from_numpy(infer(client, package.task_id, images))
                torch.testing.assert_close(got, expected[package.task_id], rtol=1e-5, atol=1e-5)
                assert len(server.engine.registry) <= 3, round_
        stats = client.get_inference_statistics("task-0", as_json=True)["model_stats"][0]  # evicted now
        assert (
            "task-0" not in server.engine.registry and int(stats["inference_stats"]["success"]["count"]) == 2
        )
        assert client.get_model_metadata("task-0").name == "task-0" and client.is_model_ready("task-0")
        assert server.metrics.cache_misses._value.get() == 16
        evictions = sum(
            sample.value
            for sample in server.metrics.cache_evictions.collect()[0].samples
            if sample.name.endswith("_total")
        )
        assert evictions == 13
        with pytest.raises(InferenceServerException, match="unknown task"):
            infer(client, "task-99", images)


def test_requests_for_one_missing_task_share_one_load(tiny_backbone: Backbone, tmp_path: Path) -> None:
    packages = write_tasks(tiny_backbone, tmp_path, 4)
    images = normalized_images(1, tiny_backbone.spec.img_size, seed=2)
    expected = expected_logits(tiny_backbone, packages, images)
    with start_server(tiny_backbone, tmp_path, model_control_mode="none", max_resident_tasks=2) as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        answers: list[object] = []
        done = threading.Event()

        def collect(result: object, error: object) -> None:
            answers.append(error or torch.from_numpy(result.as_numpy("logits").copy()))
            if len(answers) == 12:
                done.set()

        tensor = grpcclient.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        for _ in range(12):
            client.async_infer("task-3", [tensor], collect)
        assert done.wait(60)
        for answer in answers:
            assert isinstance(answer, torch.Tensor), answer
            torch.testing.assert_close(answer, expected["task-3"], rtol=1e-5, atol=1e-5)
        loads = server.metrics.cache_loads.labels("task-3", "disk")._value.get()
        assert loads == 1 and server.metrics.cache_misses._value.get() == 1


def test_eviction_never_drops_or_misroutes_queued_requests(tiny_backbone: Backbone, tmp_path: Path) -> None:
    # 10 tasks, 2 resident: 60 concurrent requests over all of them. Every request is answered, by its
    # own task; requests in flight keep their tasks resident (over the budget while they are all wanted).
    packages = write_tasks(tiny_backbone, tmp_path, 11)  # the flood uses 10
    images = normalized_images(1, tiny_backbone.spec.img_size, seed=3)
    expected = expected_logits(tiny_backbone, packages, images)
    with start_server(tiny_backbone, tmp_path, model_control_mode="none", max_resident_tasks=2) as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        lock, answers, done = threading.Lock(), {}, threading.Event()
        tensor = grpcclient.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)

        def answer(request: int):
            def collect(result: object, error: object) -> None:
                with lock:
                    answers[request] = error or torch.from_numpy(result.as_numpy("logits").copy())
                    if len(answers) == 60:
                        done.set()

            return collect

        order = [packages[(7 * request) % 10].task_id for request in range(60)]
        for request, task_id in enumerate(order):
            client.async_infer(task_id, [tensor], answer(request))
        assert done.wait(120)
        for request, task_id in enumerate(order):
            assert isinstance(answers[request], torch.Tensor), answers[request]
            torch.testing.assert_close(answers[request], expected[task_id], rtol=1e-5, atol=1e-5)
        # Once nothing is in flight, the next miss evicts back down to the budget.
        infer(client, packages[10].task_id, images)
        assert len(server.engine.registry) == 2


def test_a_pinned_task_survives_pressure(tiny_backbone: Backbone, tmp_path: Path) -> None:
    packages = write_tasks(tiny_backbone, tmp_path, 8)
    images = normalized_images(1, tiny_backbone.spec.img_size, seed=4)
    with start_server(
        tiny_backbone,
        tmp_path,
        model_control_mode="explicit",
        load_tasks=["*"],
        max_resident_tasks=2,
        pin_tasks=["task-0"],
    ) as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        client.load_model("task-1", config='{"parameters": {"pin": {"string_value": "true"}}}')
        pinned = {key: server.engine.registry.get(key).version for key in ("task-0", "task-1")}
        for package in packages[2:] * 2:
            infer(client, package.task_id, images)
        assert {key: server.engine.registry.get(key).version for key in pinned} == pinned  # never evicted
        client.load_model("task-1", config='{"parameters": {"pin": {"string_value": "false"}}}')
        for package in packages[2:]:
            infer(client, package.task_id, images)
        assert "task-0" in server.engine.registry and "task-1" not in server.engine.registry
        with pytest.raises(InferenceServerException, match="pin"):
            client.load_model("task-2", config='{"parameters": {"pin": {"string_value": "maybe"}}}')


def test_a_corrupt_package_among_ten_thousand_fails_only_its_own_requests(
    tiny_backbone: Backbone, tmp_path: Path
) -> None:
    template, _ = random_package(tiny_backbone, "t-00000", seed=1, num_prompts=2, num_kv=1, num_classes=3)
    for index in range(10_000):
        package = TaskPackage(**{**vars(template), "task_id": f"t-{index:05d}"})
        (tmp_path / f"t-{index:05d}.safetensors").write_bytes(package.to_bytes())  # no fsync per file
    corrupt = tmp_path / "t-04321.safetensors"
    data = bytearray(corrupt.read_bytes())
    data[-20:] = bytes(20)  # the tensors' bytes no longer match the recorded checksum
    corrupt.write_bytes(bytes(data))
    images = normalized_images(1, tiny_backbone.spec.img_size, seed=5)
    with start_server(tiny_backbone, tmp_path, model_control_mode="none", max_resident_tasks=100) as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.is_server_ready()
        expected = torch.from_numpy(infer(client, "t-00001", images))
        for _ in range(2):  # the second failure comes from the recorded one, without reading the file again
            with pytest.raises(InferenceServerException, match=r"could not be loaded.*checksum") as caught:
                infer(client, "t-04321", images)
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
        for task_id in ("t-00002", "t-09999", "t-00001"):
            torch.testing.assert_close(torch.from_numpy(infer(client, task_id, images)), expected)
        assert client.is_server_ready()  # one task's failed load is not the server's
        index = {row["name"]: row for row in client.get_model_repository_index(as_json=True)["models"]}
        assert len(index) == 10_000 and index["t-04321"]["state"] == "UNAVAILABLE"
        assert "checksum" in index["t-04321"]["reason"] and index["t-00002"]["reason"] == "resident"


def test_budget_is_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CacheBudget(max_resident_tasks=0)
    assert not CacheBudget().bounded and CacheBudget(max_resident_bytes=1).bounded


class MemorySource:
    """A repository of package bytes in memory, as an object store client would hold them."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.reads = 0

    def ids(self) -> list[str]:
        return sorted(self.objects)

    def signature(self, task_id: str) -> Hashable:
        if task_id not in self.objects:
            raise TaskNotFoundError(f"no object {task_id}")
        return hashlib.sha256(self.objects[task_id]).hexdigest()  # an ETag

    def read(self, task_id: str, backbone: Backbone) -> TaskPackage:
        self.reads += 1
        return package_from_bytes(self.objects[task_id], backbone, self.package_name(task_id))

    def package_name(self, task_id: str) -> str:
        return f"{task_id}.safetensors"


def test_an_object_store_plugs_in_as_a_package_source(tiny_backbone: Backbone, tmp_path: Path) -> None:
    packages = [random_package(tiny_backbone, f"obj-{i}", seed=i, num_classes=3)[0] for i in range(3)]
    source = MemorySource({p.task_id: p.to_bytes() for p in packages})
    registry = TaskRegistry(tiny_backbone)
    budget = CacheBudget(max_resident_tasks=1, max_host_bytes=2**20)
    store = TaskStore(tmp_path, registry, "none", budget=budget, source=source)
    store.start()
    assert store.available() == ["obj-0", "obj-1", "obj-2"] and len(registry) == 0
    first = store.fetch("obj-1").result(10)
    assert first.version == 1 and registry.get("obj-1").num_classes == 3
    weight, _ = registry.tables.head(first.slot)
    assert torch.equal(weight, packages[1].head_weight)
    store.fetch("obj-0").result(10)  # evicts obj-1 (budget 1); it stays compiled on the host
    again = store.fetch("obj-1").result(10)
    assert again.version == 1 and source.reads == 2  # the same object: same version, not read again
    source.objects["obj-1"] = random_package(tiny_backbone, "obj-1", seed=9, num_classes=4)[0].to_bytes()
    store.fetch("obj-0").result(10)
    changed = store.fetch("obj-1").result(10)
    assert changed.version == 2 and changed.num_classes == 4  # a new ETag is a new version
    source.objects["obj-2"] = source.objects["obj-2"][:-8]
    with pytest.raises(PackageError, match=r"obj-2\.safetensors: truncated or corrupt"):
        store.fetch("obj-2").result(10)
    assert store.failures() == store.failures(on_demand=True) != store.failures(on_demand=False) == {}
    store.stop()


def test_load_parameters_that_pin() -> None:
    pin = '{"parameters": {"pin": {"string_value": "%s"}}}'
    assert load_pin({}) is None and load_pin({"unload_dependents": True}) is None
    assert load_pin({"pin": True}) is True and load_pin({"pin": "False"}) is False
    assert load_pin({"config": pin % "true"}) is True and load_pin({"config": pin % "false"}) is False
    for bad in (
        {"pin": "yes"},
        {"pin": 1},
        {"config": "{}"},
        {"config": '{"max_batch_size": 4}'},
        {"config": "["},
    ):
        with pytest.raises(ServingError) as caught:
            load_pin(bad)
        assert caught.value.status is Status.INVALID_ARGUMENT

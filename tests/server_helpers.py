"""Builders shared by the server tests: tiny task packages, a server on loopback, reference forwards."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# One port picker and one readiness wait for every served subprocess, shared with the serve benchmark.
from benchmarks.common import free_port as free_port
from benchmarks.common import wait_until_ready as wait_until_ready
from runtime.core.backbone import Backbone
from runtime.core.package import TaskPackage
from runtime.core.registry import TaskRegistry
from runtime.engines.torch_engine import Engine
from runtime.serving.server import BackgroundServer, InferenceServer, ServerConfig
from tests.helpers import random_package


def make_package(backbone: Backbone, task_id: str, seed: int, classes: int = 5) -> TaskPackage:
    """A small pruned task with labels (``<task id>-label-<c>``), as the server tests serve them."""
    package, _ = random_package(
        backbone,
        task_id,
        seed,
        num_prompts=4,
        num_kv=2,
        num_classes=classes,
        shared_kv=seed % 2 == 0,
        pruned_tokens=1,
        pruned_segments=5,
        labels=[f"{task_id}-label-{c}" for c in range(classes)],
    )
    return package


def write_tasks(backbone: Backbone, directory: Path, count: int, prefix: str = "task") -> list[TaskPackage]:
    packages = [make_package(backbone, f"{prefix}-{i}", seed=100 + i, classes=3 + i) for i in range(count)]
    for package in packages:
        package.save(directory / f"{package.task_id}.safetensors")
    return packages


def reference_engine(backbone: Backbone, packages: list[TaskPackage]) -> Engine:
    engine = Engine(backbone, TaskRegistry(backbone))
    for package in packages:
        engine.registry.add(package)
    return engine


def start_server(backbone: Backbone, task_dir: Path, **overrides: object) -> BackgroundServer:
    settings = {
        "host": "127.0.0.1",
        "port": 0,
        "task_dir": task_dir,
        "model_control_mode": "explicit",
        "load_tasks": ["*"],
        "max_batch_size": 16,
        "max_queue_delay_ms": 20.0,
        "grace_seconds": 5.0,
    }
    settings.update(overrides)
    return BackgroundServer(
        InferenceServer(Engine(backbone, TaskRegistry(backbone)), ServerConfig(**settings))
    )


def png_bytes(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def normalized_images(count: int, size: int, seed: int) -> np.ndarray:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed)).numpy()


class RecordingEngine:
    """A real engine that records each batch's task ids and can hold a batch until released."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = engine.registry
        self.backbone = engine.backbone
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def warm_up(self, batch_sizes):
        self.engine.warm_up(batch_sizes)

    def forward_entries(self, snapshot, images, entries):
        self.batches.append([entry.task_id for entry in entries])
        self.started.set()
        self.release.wait(10)
        return self.engine.forward_entries(snapshot, images, entries)

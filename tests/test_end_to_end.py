"""The user's path, with real files and processes: training checkpoint -> exporter -> server -> client.

A checkpoint in the paper code's layout is exported (task package and backbone file) through the
command line, a real `python -m runtime serve` loads both from disk (its architecture read from the
backbone file), and `tritonclient` gets the logits the paper's forward gives for that checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient

from runtime.core.backbone import Backbone
from runtime.paper.layout import to_paper_state_dict
from runtime.paper.reference import paper_forward
from tests.conftest import TINY
from tests.helpers import random_prompts, relative_error
from tests.server_helpers import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, Path, dict, torch.Tensor]:
    backbone = Backbone.create(TINY, "random", seed=21)
    prompts = random_prompts(backbone, seed=5, num_prompts=10, num_kv=5, pruned_tokens=3, pruned_segments=12)
    state = to_paper_state_dict(backbone.model.state_dict(), prompts)
    checkpoint = tmp_path / "last_model.pth"
    torch.save({"model": state}, checkpoint)
    tasks = tmp_path / "tasks"
    run("-m", "exporter", "backbone", str(checkpoint), "-o", str(tmp_path / "backbone.safetensors"))
    run("-m", "exporter", str(checkpoint), "--task-id", "flowers", "-o", f"{tasks}/")
    images = torch.randn(3, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(4))
    return tmp_path / "backbone.safetensors", tasks, state, images


def test_checkpoint_to_served_logits(exported: tuple[Path, Path, dict, torch.Tensor]) -> None:
    backbone_file, tasks, state, images = exported
    assert (tasks / "flowers.safetensors").is_file()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "runtime", "serve", "--weights", str(backbone_file), "--task-dir", str(tasks),
         "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--http-port", "0"],
        cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until_ready(f"127.0.0.1:{port}", server, timeout=60, task="flowers")
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = grpcclient.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images.numpy())
        served = client.infer("flowers", [tensor]).as_numpy("logits")
    finally:
        server.terminate()
        try:
            _, errors = server.communicate(timeout=30)  # drains stderr so the server never blocks on it
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
            raise
    assert server.returncode == 0, errors
    expected = paper_forward(state, images, TINY.num_heads)
    assert served.shape == tuple(expected.shape)
    assert relative_error(torch.tensor(served), expected) <= 1e-5

"""SIGTERM drains: a real `python -m runtime serve` answers what it accepted, then exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
from tritonclient.grpc import aio as aioclient

from runtime.core.backbone import Backbone
from tests.conftest import TINY
from tests.server_helpers import free_port, wait_until_ready, write_tasks

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 32
# Long enough that the whole burst is admitted and waits in one open batch when SIGTERM arrives; a
# drain that waited for it would still end well within the clients' timeout.
QUEUE_DELAY_MS = 2000


def inflight(metrics_port: int) -> float:
    """The server's admitted-but-unanswered requests, from its Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("e2vpt_inflight_requests ")
    )


def test_sigterm_finishes_accepted_requests_and_exits_zero(tmp_path):
    backbone = Backbone.create(TINY, "random", seed=7)
    weights = backbone.save(tmp_path / "backbone.safetensors")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(backbone, tasks, 2)
    port, metrics_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "runtime", "--log-format", "json", "serve", "--weights", str(weights),
        "--task-dir", str(tasks), "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(metrics_port), "--http-port", "0", "--max-batch-size", str(2 * REQUESTS),
        "--max-queue-delay-ms", str(QUEUE_DELAY_MS), "--grace-seconds", "30",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"127.0.0.1:{port}"
        wait_until_ready(url, process, timeout=120, task="task-1")
        size = TINY.img_size
        pixels = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)

        async def burst() -> tuple[list[object], int]:
            loop = asyncio.get_running_loop()
            async with aioclient.InferenceServerClient(url) as client:

                async def one(index: int) -> object:
                    tensor = aioclient.InferInput("pixels", list(pixels.shape), "UINT8")
                    tensor.set_data_from_numpy(pixels)
                    return await client.infer(f"task-{index % 2}", [tensor], client_timeout=60)

                pending = [asyncio.ensure_future(one(i)) for i in range(REQUESTS)]
                # Signal once the server holds the whole burst: every request admitted, none answered.
                while await loop.run_in_executor(None, inflight, metrics_port) < REQUESTS:
                    assert not any(request.done() for request in pending), "answered before the burst was in"
                answered_before_signal = sum(request.done() for request in pending)
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*pending), answered_before_signal

        answers, answered_before_signal = asyncio.run(burst())
        assert answered_before_signal == 0, "the burst should still be waiting when SIGTERM arrives"
        assert len(answers) == REQUESTS
        assert process.wait(60) == 0
        logs = process.stderr.read()
        assert '"message": "server stopped"' in logs and '"drained": true' in logs
        assert all(json.loads(line) for line in logs.splitlines()), "--log-format json writes JSON lines"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

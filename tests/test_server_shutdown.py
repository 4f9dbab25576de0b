"""SIGTERM drains: a real `python -m runtime serve` answers what it accepted, then exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import aio as aioclient

from runtime.demo import default_backbone, write_demo_tasks

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_accepted_requests_and_exits_zero(tmp_path):
    write_demo_tasks(default_backbone(), tmp_path, 2)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "runtime",
        "--log-format",
        "json",
        "serve",
        "--backbone",
        "vit_tiny_patch16_224",
        "--weights",
        "random",
        "--task-dir",
        str(tmp_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--max-batch-size",
        "4",
        "--max-queue-delay-ms",
        "2",
        "--grace-seconds",
        "30",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"127.0.0.1:{port}"
        with grpcclient.InferenceServerClient(url) as client:
            for _ in range(600):
                try:
                    if client.is_server_ready():
                        break
                except Exception:
                    time.sleep(0.1)
            assert client.is_model_ready("demo-task-0")
        pixels = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)

        async def burst() -> tuple[list[float], float]:
            async with aioclient.InferenceServerClient(url) as aclient:

                async def one(index: int) -> float:
                    tensor = aioclient.InferInput("pixels", list(pixels.shape), "UINT8")
                    tensor.set_data_from_numpy(pixels)
                    await aclient.infer(f"demo-task-{index % 2}", [tensor])
                    return time.monotonic()

                pending = [asyncio.ensure_future(one(i)) for i in range(32)]
                # Signal once the server is busy: one answer is back, the rest are queued or computing.
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                sent_signal = time.monotonic()
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*pending), sent_signal

        finished, signalled = asyncio.run(burst())
        assert len(finished) == 32
        assert max(finished) > signalled, "the burst should still be running when SIGTERM arrives"
        assert process.wait(60) == 0
        logs = process.stderr.read()
        assert '"message": "server stopped"' in logs and '"drained": true' in logs
        assert "RANDOM, not pretrained" in logs
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

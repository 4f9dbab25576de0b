"""A flood of 1,000 concurrent requests against a real `python -m runtime serve`: the server's resident
memory stays within ``ServerConfig.memory_budget`` and returns, every request is answered or
cleanly refused before any work (see ``CLEAN_REFUSALS``).
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import aio as aioclient
from tritonclient.utils import InferenceServerException

from benchmarks.common import free_port, wait_until_ready
from runtime.serving.server import ServerConfig
from tests.server_helpers import write_tasks

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 1000
CHANNELS = 4
SETTINGS = {  # flags of the served process, and the same settings as a ServerConfig
    "max_inflight": 64,
    "max_preprocess_backlog": 16,
    "max_batch_size": 8,
    "max_streams_per_connection": 100,
    "max_image_pixels": 1_000_000,
}
# A refused request never started: admission, HTTP/2 REFUSED_STREAM (error code 7) beyond the
# streams per connection, gRPC's own limit on concurrent calls.
CLEAN_REFUSALS = (
    ("UNAVAILABLE", "retry later"),
    ("UNAVAILABLE", "RST_STREAM with error code 7"),
    ("RESOURCE_EXHAUSTED", "Concurrent RPC limit"),
)


def memory(pid: int, field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def gradient_png(width: int, height: int) -> bytes:
    """A small file that decodes to ``width x height`` pixels: what a flood of cheap requests sends."""
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (height, 1))] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_a_flood_of_concurrent_requests_stays_within_the_memory_budget(tiny_backbone, tmp_path):
    tiny_backbone.save(tmp_path / "backbone.safetensors")
    write_tasks(tiny_backbone, tmp_path, 4)
    image = gradient_png(640, 480)
    port = free_port()
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in SETTINGS.items()]
    server = subprocess.Popen(
        [sys.executable, "-m", "runtime", "serve", "--weights", str(tmp_path / "backbone.safetensors"),
         "--task-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port), "--no-metrics", *flags],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    budget = ServerConfig(**SETTINGS).memory_budget(tiny_backbone.spec.img_size, len(image))

    def request() -> list[aioclient.InferInput]:
        tensor = aioclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
        return [tensor]

    async def send(count: int) -> dict[str, int]:
        clients = [aioclient.InferenceServerClient(address) for _ in range(CHANNELS)]
        outcomes: dict[str, int] = {}

        async def one(index: int) -> None:
            try:
                await clients[index % CHANNELS].infer(f"task-{index % 4}", request())
                outcome = "OK"
            except InferenceServerException as error:
                outcome = error.status().removeprefix("StatusCode.")
                assert any(
                    outcome == expected and refusal in error.message() for expected, refusal in CLEAN_REFUSALS
                ), error
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        try:
            for client in clients:  # connected first: each knows the server's stream limit
                assert await client.is_server_live()
            await asyncio.gather(*(one(index) for index in range(count)))
        finally:
            for client in clients:
                await client.close()
        return outcomes

    try:
        wait_until_ready(address, server, timeout=120)
        for _ in range(4):  # warm, below every limit: every code path has run
            assert asyncio.run(send(12)) == {"OK": 12}
        idle = memory(server.pid, "VmRSS")
        with open(f"/proc/{server.pid}/clear_refs", "w") as clear:
            clear.write("5")  # the peak (VmHWM) restarts from now
        outcomes = asyncio.run(send(REQUESTS))
        peak, after = memory(server.pid, "VmHWM"), memory(server.pid, "VmRSS")
        assert asyncio.run(send(8)) == {"OK": 8}, "the server serves normally after the flood"
    finally:
        server.terminate()
        server.wait(60)
    assert sum(outcomes.values()) == REQUESTS
    assert outcomes.get("OK", 0) >= SETTINGS["max_inflight"] and outcomes.get("UNAVAILABLE", 0) > 0, outcomes
    assert peak - idle <= budget, (
        f"peak grew {(peak - idle) / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB"
    )
    assert after - idle <= budget
    print(
        f"flood of {REQUESTS}: {outcomes}; resident {idle / 2**20:.0f} MiB idle, "
        f"peak +{(peak - idle) / 2**20:.1f} MiB, after +{(after - idle) / 2**20:.1f} MiB, "
        f"budget +{budget / 2**20:.0f} MiB"
    )

"""Floods and refusals against a real server: helpers of the flood test, and the README's figures.

``python -m tests.flood`` prints the "Reliability" figures of README.md (about 1 minute on 2 cores):
resident memory of a `python -m runtime serve` process under floods of 1,000 concurrent requests,
how fast a full server refuses, how fast an oversized image is refused, and how fast ServerLive
answers while a task load is blocked.
"""

from __future__ import annotations

import asyncio
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
from PIL import Image
from tritonclient.grpc import aio as aioclient
from tritonclient.utils import InferenceServerException

from benchmarks.common import free_port, wait_until_ready
from runtime.core.backbone import Backbone
from runtime.serving.server import ServerConfig
from tests.server_helpers import write_tasks

ROOT = Path(__file__).resolve().parents[1]
TASKS = 4
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


def reset_peak(pid: int) -> None:
    """Restart the process's peak resident size (``VmHWM``) from its current size."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")


def gradient_png(width: int, height: int) -> bytes:
    """A small file that decodes to ``width x height`` pixels: what a flood of cheap requests sends."""
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (height, 1))] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def served(backbone: Backbone, directory: Path, settings: dict[str, int]) -> Iterator[tuple[str, int]]:
    """`python -m runtime serve` of ``backbone`` and ``TASKS`` tasks, ``settings`` as its flags;
    yields its address and process id once it is ready."""
    # The weights beside, not inside, the task directory: every file there must be a task package.
    weights = directory / "backbone" / "backbone.safetensors"
    weights.parent.mkdir()
    backbone.save(weights)
    tasks = directory / "tasks"
    tasks.mkdir()
    write_tasks(backbone, tasks, TASKS)
    port = free_port()
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
    process = subprocess.Popen(
        [sys.executable, "-m", "runtime", "serve", "--weights", str(weights), "--task-dir", str(tasks),
         "--host", "127.0.0.1", "--port", str(port), "--no-metrics", "--no-http", *flags],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        wait_until_ready(address, process, timeout=120)
        yield address, process.pid
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def flood(address: str, image: bytes, count: int, channels: int = 4) -> dict[str, int]:
    """``count`` concurrent requests of ``image`` over ``channels`` connections; outcomes by status.

    Raises AssertionError for any failure that is not a clean refusal."""
    clients = [aioclient.InferenceServerClient(address) for _ in range(channels)]
    outcomes: dict[str, int] = {}

    async def one(index: int) -> None:
        tensor = aioclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
        try:
            await clients[index % channels].infer(f"task-{index % TASKS}", [tensor])
            outcome = "OK"
        except InferenceServerException as error:
            outcome = error.status().removeprefix("StatusCode.")
            clean = any(outcome == code and text in error.message() for code, text in CLEAN_REFUSALS)
            assert clean, f"not a clean refusal: {outcome} {error.message()}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    try:
        for client in clients:  # connected first: each knows the server's stream limit
            assert await client.is_server_live()
        await asyncio.gather(*(one(index) for index in range(count)))
    finally:
        for client in clients:
            await client.close()
    return outcomes


def measured_flood(address: str, pid: int, image: bytes, count: int) -> tuple[dict[str, int], int, int]:
    """Warm the server below its limits, then flood it: outcomes, peak and final resident growth."""
    for _ in range(4):
        assert asyncio.run(flood(address, image, 12)) == {"OK": 12}
    idle = memory(pid, "VmRSS")
    reset_peak(pid)
    outcomes = asyncio.run(flood(address, image, count))
    return outcomes, memory(pid, "VmHWM") - idle, memory(pid, "VmRSS") - idle


def _timed(call: Callable[[], object], rounds: int) -> str:
    """Median and slowest of ``rounds`` calls, in ms (a refusal counts as a return)."""
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        with suppress(InferenceServerException):
            call()
        times.append((time.perf_counter() - began) * 1000)
    return f"p50 {statistics.median(times):.2f} ms, max {max(times):.2f} ms over {rounds}"


def refusal_figures(backbone: Backbone, directory: Path) -> None:
    import tritonclient.grpc as grpcclient

    from tests.server_helpers import make_package, normalized_images
    from tests.test_server_reliability import fp32_input, gated_engine, in_thread, serve, wait_until

    write_tasks(backbone, directory, 1)
    engine = gated_engine(backbone)
    one = [fp32_input(normalized_images(1, backbone.spec.img_size, 1))]
    with (
        serve(engine, directory, max_inflight=2) as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client,
    ):
        print(f"  answered request, idle server: {_timed(lambda: client.infer('task-0', one), 100)}")
        engine.release.clear()
        computing, _ = in_thread(lambda: client.infer("task-0", one))
        assert engine.started.wait(10)
        queued, _ = in_thread(lambda: client.infer("task-0", one))
        wait_until(lambda: server.admission.count == 2, "the server is full")
        print(f"  UNAVAILABLE from a full server: {_timed(lambda: client.infer('task-0', one), 200)}")
        engine.release.set()
        computing.join()
        queued.join()
        buffer = io.BytesIO()
        Image.new("RGB", (20000, 1)).save(buffer, format="PNG")
        strip = grpcclient.InferInput("image", [1], "BYTES")
        strip.set_data_from_numpy(np.array([buffer.getvalue()], dtype=np.object_))
        timing = _timed(lambda: client.infer("task-0", [strip]), 50)
        print(f"  INVALID_ARGUMENT for a {len(buffer.getvalue())}-byte 20000x1 PNG: {timing}")
        make_package(backbone, "slow", seed=9).save(directory / "slow.safetensors")
        engine.registry.block_adds = True
        loading, _ = in_thread(lambda: client.load_model("slow"))
        assert engine.registry.add_entered.wait(10)
        print(f"  ServerLive while a load is blocked: {_timed(client.is_server_live, 300)}")
        engine.registry.add_may_finish.set()
        loading.join()


def main() -> None:
    from tests.conftest import TINY

    backbone = Backbone.create(TINY, "random", seed=7)
    floods = [
        ("test settings (tests/test_server_flood.py), 640x480 PNGs", gradient_png(640, 480), {
            "max_inflight": 64, "max_preprocess_backlog": 16, "max_batch_size": 8,
            "max_streams_per_connection": 100, "max_image_pixels": 1_000_000,
        }),
        ("defaults, 640x480 PNGs", gradient_png(640, 480), {}),
        ("defaults, PNGs that decode to 4000x4000", gradient_png(4000, 4000), {}),
    ]  # fmt: skip
    print(f"Floods of 1,000 concurrent requests on 4 connections, backbone {TINY.name}:")
    for title, image, settings in floods:
        with (
            tempfile.TemporaryDirectory() as scratch,
            served(backbone, Path(scratch), settings) as (address, pid),
        ):
            idle = memory(pid, "VmRSS")
            outcomes, peak, after = measured_flood(address, pid, image, 1000)
        budget = ServerConfig(**settings).memory_budget(TINY.img_size, len(image))
        print(
            f"  {title} ({len(image):,} bytes): {outcomes}; resident {idle / 2**20:.0f} MiB idle, "
            f"peak +{peak / 2**20:.1f} MiB, after +{after / 2**20:.1f} MiB, budget +{budget / 2**20:.0f} MiB"
        )
    print("Refusals and answers, in-process server, sequential calls:")
    with tempfile.TemporaryDirectory() as scratch:
        refusal_figures(backbone, Path(scratch))


if __name__ == "__main__":
    main()

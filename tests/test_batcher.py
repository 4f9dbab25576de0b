"""The dynamic batcher: mixed-task batches, limits, expiry, cancellation, held entries mid-queue."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from runtime.core.registry import TaskRegistry
from runtime.engines.torch_engine import Engine
from runtime.serving.batcher import (
    Batcher,
    BatcherConfig,
    DeadlineExpiredError,
    QueueFullError,
    ShuttingDownError,
)
from runtime.serving.metrics import ServerMetrics
from tests.server_helpers import RecordingEngine, make_package


@pytest.fixture
def engine(tiny_backbone):
    registry = TaskRegistry(tiny_backbone)
    for index in range(3):
        registry.add(make_package(tiny_backbone, f"t{index}", seed=index))
    return RecordingEngine(Engine(tiny_backbone, registry))


def images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def infer(batcher: Batcher, task_id: str, x: torch.Tensor, timeout: float | None = None):
    """Queue ``x`` under the task's current entry, as the server does after resolving it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    return batcher.infer(batcher.engine.registry.get(task_id), x, deadline)


def run(batcher: Batcher, coroutine):
    batcher.start()
    try:
        return asyncio.run(coroutine)
    finally:
        batcher.stop(5)


async def queued(batcher: Batcher, requests) -> list[asyncio.Future]:
    """Start ``requests`` (``batcher.infer`` calls) and return once every one of them is queued.

    ``infer`` queues before its first await, so one turn of the event loop, which runs each new task
    up to that await, is enough; no waiting on the clock.
    """
    before = batcher.depth
    pending = [asyncio.ensure_future(request) for request in requests]
    await asyncio.sleep(0)
    assert batcher.depth == before + len(pending)
    return pending


def test_requests_of_different_tasks_share_a_batch_and_match_direct_forward(engine, tiny_backbone):
    size = tiny_backbone.spec.img_size
    batcher = Batcher(engine, BatcherConfig(max_batch_size=8, max_queue_delay=0.2), ServerMetrics())
    inputs = [images(n, size, seed=i) for i, n in enumerate((1, 2, 1, 3))]
    tasks = ["t0", "t1", "t2", "t0"]

    async def main():
        return await asyncio.gather(*(infer(batcher, t, x) for t, x in zip(tasks, inputs, strict=True)))

    results = run(batcher, main())
    assert engine.batches == [["t0", "t1", "t1", "t2", "t0", "t0", "t0"]]
    for task, x, result in zip(tasks, inputs, results, strict=True):
        expected = torch.stack(engine.engine.forward(x, [task] * x.shape[0]))
        assert torch.allclose(result.logits, expected, atol=1e-5)
        assert result.entry.task_id == task and result.batch_rows == 7


def test_per_task_batching_keeps_tasks_apart_in_arrival_order(engine, tiny_backbone):
    size = tiny_backbone.spec.img_size
    config = BatcherConfig(max_batch_size=8, max_queue_delay=0.2, batching="per-task")
    batcher = Batcher(engine, config, ServerMetrics())
    tasks = ["t0", "t1", "t0", "t2", "t1", "t0"]

    async def main():
        return await asyncio.gather(
            *(infer(batcher, t, images(1, size, seed=i)) for i, t in enumerate(tasks))
        )

    results = run(batcher, main())
    assert engine.batches == [["t0", "t0", "t0"], ["t1", "t1"], ["t2"]]
    assert [result.entry.task_id for result in results] == tasks


def test_unknown_batching_mode_is_refused():
    with pytest.raises(ValueError, match="batching 'round-robin'"):
        BatcherConfig(batching="round-robin")


def test_batches_never_exceed_max_rows_nor_split_a_request(engine, tiny_backbone):
    size = tiny_backbone.spec.img_size
    batcher = Batcher(engine, BatcherConfig(max_batch_size=4, max_queue_delay=0.2), ServerMetrics())

    async def main():
        await asyncio.gather(*(infer(batcher, "t1", images(n, size)) for n in (3, 2, 2, 1, 4)))
        with pytest.raises(ValueError, match="exceeds max_batch_size 4"):
            await infer(batcher, "t1", images(5, size))

    run(batcher, main())
    sizes = [len(batch) for batch in engine.batches]
    assert sum(sizes) == 12 and max(sizes) <= 4


def test_full_queue_rejects_at_once_and_expired_or_cancelled_requests_skip_compute(engine, tiny_backbone):
    size = tiny_backbone.spec.img_size
    metrics = ServerMetrics()
    batcher = Batcher(engine, BatcherConfig(max_batch_size=1, max_queue_delay=0, max_queue_size=2), metrics)
    engine.release.clear()

    async def main():
        first = asyncio.ensure_future(infer(batcher, "t0", images(1, size)))
        await asyncio.get_running_loop().run_in_executor(None, engine.started.wait, 5)
        # Timeout 0: the deadline has passed whenever its batch forms, however fast that is.
        expiring, cancelled = await queued(
            batcher,
            [infer(batcher, "t1", images(1, size), timeout=0.0), infer(batcher, "t2", images(1, size))],
        )
        with pytest.raises(QueueFullError, match="queue is full"):
            await infer(batcher, "t0", images(1, size))
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        engine.release.set()
        await first
        with pytest.raises(DeadlineExpiredError):
            await expiring

    run(batcher, main())
    assert engine.batches == [["t0"]]
    dropped = {
        s.labels["reason"]: s.value
        for m in metrics.registry.collect()
        for s in m.samples
        if s.name == "e2vpt_dropped_requests_total"
    }
    assert dropped == {"deadline": 1.0, "cancelled": 1.0}


def test_held_entries_compute_with_their_version_after_unload_and_slot_pressure(engine, tiny_backbone):
    """A request computes with the entry it was admitted under, even once its task is unloaded
    and another task was loaded meanwhile (the held slot is not reused)."""
    size = tiny_backbone.spec.img_size
    registry = engine.registry
    x = images(1, size, seed=3)
    expected = torch.stack(engine.engine.forward(x, ["t1"]))
    batcher = Batcher(engine, BatcherConfig(max_batch_size=8, max_queue_delay=0), ServerMetrics())
    engine.release.clear()

    async def main():
        blocker = asyncio.ensure_future(infer(batcher, "t0", x))
        await asyncio.get_running_loop().run_in_executor(None, engine.started.wait, 5)
        held = registry.hold("t1")
        waiting = asyncio.ensure_future(batcher.infer(held, x))
        registry.remove("t1")
        for index in range(8):  # enough new tasks to need every free slot
            registry.add(make_package(tiny_backbone, f"new{index}", seed=50 + index))
        engine.release.set()
        await blocker
        result = await waiting
        registry.release(held)
        return held, result

    held, result = run(batcher, main())
    assert result.entry is held and "t1" not in registry
    assert all(entry.slot != held.slot for entry in registry.snapshot.tasks.values())
    assert torch.allclose(result.logits, expected, atol=1e-5)


def test_stop_drains_queued_requests_then_refuses(engine, tiny_backbone):
    size = tiny_backbone.spec.img_size
    batcher = Batcher(engine, BatcherConfig(max_batch_size=2, max_queue_delay=0.5), ServerMetrics())
    batcher.start()

    async def main():
        engine.release.clear()  # hold the first batch so that all five are still queued at stop()
        pending = [asyncio.ensure_future(infer(batcher, "t0", images(1, size)))]
        await asyncio.get_running_loop().run_in_executor(None, engine.started.wait, 5)
        pending += await queued(batcher, [infer(batcher, "t0", images(1, size)) for _ in range(4)])
        stopped = asyncio.get_running_loop().run_in_executor(None, batcher.stop, 10)
        engine.release.set()
        results = await asyncio.gather(*pending)
        assert await stopped
        with pytest.raises(ShuttingDownError):
            await infer(batcher, "t0", images(1, size))
        return results

    assert len(asyncio.run(main())) == 5


def test_batches_can_run_on_the_callers_thread(engine, tiny_backbone):
    """``open()`` + ``run()``: the thread that calls ``run`` warms the engine up for every batch size,
    then computes every batch, until ``stop``."""
    import threading

    size = tiny_backbone.spec.img_size
    batcher = Batcher(engine, BatcherConfig(max_batch_size=4, max_queue_delay=0.05), ServerMetrics())
    batcher.open()
    computing_threads = set()
    warm_ups = []
    forward = engine.forward_entries

    def recording_forward(*args):
        computing_threads.add(threading.get_ident())
        return forward(*args)

    def recording_warm_up(batch_sizes):
        assert not engine.batches, "warm-up comes before the first batch"
        warm_ups.append((threading.get_ident(), list(batch_sizes)))

    engine.forward_entries = recording_forward
    engine.warm_up = recording_warm_up
    answers = []

    def client():
        async def main():
            results = await asyncio.gather(
                *(infer(batcher, f"t{i % 3}", images(1, size, i)) for i in range(6))
            )
            answers.extend(results)
            assert await asyncio.get_running_loop().run_in_executor(None, batcher.stop, 10)

        asyncio.run(main())

    requester = threading.Thread(target=client)
    requester.start()
    batcher.run()  # returns once the client's stop() has drained the queue
    requester.join()
    assert computing_threads == {threading.get_ident()}
    assert warm_ups == [(threading.get_ident(), [1, 2, 3, 4])] and batcher.warmed.is_set()
    assert len(answers) == 6

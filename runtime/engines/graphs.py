"""CUDA graphs of the whole mixed-task forward: one capture per batch-size bucket, any task mix replays it.

On a GPU small batches are launch-bound: ViT-B/16 at batch 8 runs 5.3 ms eager against 1.1 ms for a
plain timm model compiled with graphs (``docs/gpu.md``). So the forward, backbone and batched heads,
is captured once per bucket (1, 2, 4, 8, then multiples of 16 up to the max batch) and replayed:

* **Persistent buffers.** A graph reads the batch's images and ``task_of_row`` from buffers of its
  :class:`GraphSet` (a batch is copied in and padded up to its bucket) and the registry's slot
  tables in place. Its plan spans the tables' whole prefix capacity (``PrefixPlan.over_tables``)
  and its heads their whole class capacity, so a graph's shapes depend on the tables' allocation
  only: loading, replacing or removing a task writes rows that the next replay reads, no recapture.
  Rows past the batch keep what an earlier batch left there: rows are independent, theirs are dropped.
* **Captured off the request path.** :meth:`GraphRunner.warm` captures the buckets covering the
  batch sizes it is given (the server warms at start). When a load reallocates the tables the
  registry calls :meth:`GraphRunner.prepare` on the loading thread *before* any snapshot uses the
  new tables, which captures the warmed buckets for them. A batch whose snapshot's tables or bucket
  has no graph runs eagerly instead: a capture never stalls a request. Each set owns its buffers and
  memory pool and is immutable once published, so capturing never overlaps a replay of the same set.
* **Hand capture, not torch.compile.** ``torch.cuda.CUDAGraph`` records exactly what the eager engine
  runs, Triton kernel included, with no tracing: the per-forward binding is a thread-local read that
  dynamo would guard on, and a new prefix capacity would recompile. A probe on an H100 got to 1.16x of
  plain compiled timm this way (``docs/gpu.md``); ``torch.compile(mode="reduce-overhead")`` might win
  the rest (inductor's elementwise fusion) once the kernel is a ``torch.library.triton_op``: a step to
  take by measurement.
* **The capture is a strategy.** :class:`CudaGraphCapture` records; :class:`EagerReplay` runs the same
  function on the same buffers at every replay, so bucketing, padding, copy-in, the capacity check and
  re-capture on growth are tested on the CPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from runtime.core.registry import SlotTables, TaskRegistry

log = logging.getLogger("e2vpt.graphs")

# (tables, images [b, 3, S, S], task_of_row [b] int32) -> logits [b, C] fp32, C the tables' class capacity.
GraphForward = Callable[[SlotTables, Tensor, Tensor], Tensor]
Replay = Callable[[], Tensor]


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then multiples of 16, then ``max_batch_size``: a bucket for every batch up to it."""
    if max_batch_size < 1:
        raise ValueError(f"max batch size must be at least 1, got {max_batch_size}")
    small = [size for size in (1, 2, 4, 8) if size < max_batch_size]
    return (*small, *range(16, max_batch_size, 16), max_batch_size)


class Capture(Protocol):
    """How a graph set records its forwards."""

    def new_pool(self) -> object:
        """Memory shared by the graphs of one set (they replay one at a time)."""

    def __call__(self, forward: Replay, pool: object) -> Replay:
        """Record ``forward`` (it reads only persistent buffers) and return what replays it.

        A replay returns the same output tensor every time, overwritten by the next replay.
        """


class EagerReplay:
    """Runs the recorded function itself at every replay: the graph path on any device, no GPU needed."""

    def __init__(self) -> None:
        self.captures = 0

    def new_pool(self) -> object:
        return None

    def __call__(self, forward: Replay, pool: object) -> Replay:
        self.captures += 1
        return forward


class CudaGraphCapture:
    """``torch.cuda.CUDAGraph`` capture on a side stream, after eager runs that compile and tune kernels.

    ``thread_local`` capture mode lets other threads keep replaying other sets while one captures.
    """

    def __init__(self, warmup_runs: int = 2) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; none is available")
        self.warmup_runs = warmup_runs

    def new_pool(self) -> object:
        return torch.cuda.graph_pool_handle()

    def __call__(self, forward: Replay, pool: object) -> Replay:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(
                self.warmup_runs
            ):  # kernels compile and tune, cuBLAS sets up: none of it capturable
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(
            graph,
            pool=pool,  # type: ignore[arg-type]  # what new_pool made: a graph pool handle
            stream=stream,
            capture_error_mode="thread_local",
        ):
            output = forward()

        def replay() -> Tensor:
            graph.replay()
            return output

        return replay


@dataclass(frozen=True, eq=False)
class GraphSet:
    """The graphs of one tables allocation: input buffers for the largest bucket, a replay per bucket."""

    tables: SlotTables
    images: Tensor
    task_of_row: Tensor
    replays: dict[int, Replay] = field(default_factory=dict)


class GraphRunner:
    """Runs mixed-task batches by replaying the graph of their bucket, captured per tables allocation.

    ``forward`` is the engine's whole forward over persistent inputs (see :data:`GraphForward`).
    """

    def __init__(
        self,
        registry: TaskRegistry,
        forward: GraphForward,
        capture: Capture,
        buckets: Sequence[int],
        image_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        self.registry = registry
        self.forward = forward
        self.capture = capture
        self.buckets = tuple(sorted(set(buckets)))
        self.image_shape = image_shape
        self.dtype = dtype
        self.device = device
        self.warm_buckets: frozenset[int] = frozenset()
        self._sets: dict[int, GraphSet] = {}  # by tables allocation
        self._capturing = threading.Lock()  # one capture at a time; warmed buckets change under it
        self._index = threading.Lock()  # the dict of sets
        self._replaying = threading.Lock()  # one batch in the buffers at a time
        registry.on_new_tables(self.prepare)

    def captured(self) -> dict[int, tuple[int, ...]]:
        """The buckets with a graph, by tables allocation."""
        with self._index:
            return {allocation: tuple(sorted(graphs.replays)) for allocation, graphs in self._sets.items()}

    def bucket(self, batch: int) -> int | None:
        """The smallest bucket holding ``batch`` rows; ``None`` above the largest."""
        return next((size for size in self.buckets if size >= batch), None)

    def warm(self, batch_sizes: Iterable[int]) -> None:
        """Capture the buckets of ``batch_sizes`` for the current tables, and for every later allocation."""
        wanted = {self.bucket(size) for size in batch_sizes}
        if None in wanted:
            raise ValueError(
                f"batch sizes above the largest bucket {self.buckets[-1]}: {sorted(batch_sizes)}"
            )
        with self._capturing:
            self.warm_buckets = self.warm_buckets | {size for size in wanted if size is not None}
            self._capture(self.registry.tables)

    def prepare(self, tables: SlotTables) -> None:
        """Capture the warmed buckets for new ``tables``: the registry calls this before using them."""
        with self._capturing:
            self._capture(tables)

    def _capture(self, tables: SlotTables) -> None:
        current = self._sets.get(tables.allocation)
        if current is not None and current.tables is tables and self.warm_buckets <= current.replays.keys():
            return
        largest = max(self.warm_buckets, default=0)
        if not largest:
            return
        with torch.inference_mode():
            graphs = GraphSet(
                tables,
                torch.zeros(largest, *self.image_shape, dtype=self.dtype, device=self.device),
                torch.zeros(largest, dtype=torch.int32, device=self.device),
            )
            pool = self.capture.new_pool()
            for size in sorted(self.warm_buckets, reverse=True):  # largest first: the rest reuse its memory
                images, task_of_row = graphs.images[:size], graphs.task_of_row[:size]

                def forward(images: Tensor = images, task_of_row: Tensor = task_of_row) -> Tensor:
                    return self.forward(tables, images, task_of_row)

                graphs.replays[size] = self.capture(forward, pool)
        log.info(
            "captured graphs",
            extra={"tables_allocation": tables.allocation, "buckets": sorted(graphs.replays)},
        )
        with self._index:
            self._sets[tables.allocation] = graphs

    def run(self, tables: SlotTables, slots: Sequence[int], images: Tensor) -> Tensor | None:
        """Logits ``[B, C]`` (fp32, CPU) of rows ``slots`` over ``tables``; ``None`` when nothing is captured.

        ``None`` (the caller runs eagerly) when the batch is above the largest bucket, its bucket was
        not warmed, or its tables are not the allocation of a captured set.
        """
        count, bucket = len(slots), self.bucket(len(slots))
        with self._index:
            graphs = self._sets.get(tables.allocation)
            if graphs is None or graphs.tables is not tables or bucket not in graphs.replays:
                return None
            for allocation in [key for key in self._sets if key < tables.allocation]:
                del self._sets[allocation]  # a batch of newer tables ran: older ones are done with
        with self._replaying, torch.inference_mode():
            graphs.images[:count].copy_(images)
            graphs.task_of_row[:count].copy_(torch.tensor(slots, dtype=torch.int32))
            return graphs.replays[bucket]()[:count].to("cpu", copy=True)

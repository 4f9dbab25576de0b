"""The PyTorch engine: timm's forward of the frozen backbone, every layer bound to the batch's prefix plan."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from runtime.core.backbone import Backbone
from runtime.core.plan import PrefixPlan
from runtime.core.registry import SlotTables, Snapshot, TaskEntry, TaskRegistry
from runtime.engines.attention import BINDERS, resolve_backend
from runtime.engines.base import InferenceEngine
from runtime.engines.graphs import Capture, CudaGraphCapture, GraphRunner, batch_buckets
from runtime.engines.heads import HeadTable
from runtime.engines.prefix_vit import PrefixViT

DEFAULT_MAX_BATCH_SIZE = 32


class Engine(InferenceEngine):
    """PyTorch: SDPA over the gathered prefix on CPU, the Triton kernel on CUDA; optionally graphs.

    ``graphs`` switches on replayed graphs of the whole forward (:mod:`runtime.engines.graphs`):
    ``CudaGraphCapture()`` on a CUDA backbone, ``EagerReplay()`` to run the same padded, persistent-
    buffer path without capture. Batches up to ``max_batch_size`` replay once :meth:`warm_up` has
    captured their bucket; anything else runs eagerly.
    """

    def __init__(
        self,
        backbone: Backbone,
        registry: TaskRegistry | None = None,
        attention: str = "auto",
        graphs: Capture | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> None:
        self.backbone = backbone
        self.registry = registry if registry is not None else TaskRegistry(backbone)
        self.attention = resolve_backend(attention, backbone.device)
        self.vit = PrefixViT(backbone.model)
        self.graphs: GraphRunner | None = None
        if graphs is not None:
            if isinstance(graphs, CudaGraphCapture) and backbone.device.type != "cuda":
                raise ValueError(
                    f"CUDA graphs need the backbone on a CUDA device, it is on {backbone.device}"
                )
            size = backbone.spec.img_size
            self.graphs = GraphRunner(
                self.registry,
                self._graph_forward,
                graphs,
                batch_buckets(max_batch_size),
                (3, size, size),
                backbone.dtype,
                backbone.device,
            )

    def features(self, plan: PrefixPlan, images: Tensor) -> Tensor:
        """Final-norm CLS features ``[B, D]`` in the backbone's dtype."""
        images = images.to(device=self.backbone.device, dtype=self.backbone.dtype)
        return self.vit.features(images, BINDERS[self.attention](plan, self.vit.num_tokens))

    def _graph_forward(self, tables: SlotTables, images: Tensor, task_of_row: Tensor) -> Tensor:
        """What a graph records: features over the tables' whole prefix capacity, then the batched heads."""
        plan = PrefixPlan.over_tables(tables, task_of_row)
        return HeadTable.of(tables).apply(self.features(plan, images), task_of_row)

    @torch.inference_mode()
    def forward_entries(
        self, snapshot: Snapshot, images: Tensor, entries: Sequence[TaskEntry]
    ) -> list[Tensor]:
        if self.graphs is not None and entries:
            self.check_batch(images, entries)
            slots = [entry.slot for entry in entries]
            logits = self.graphs.run(snapshot.tables, slots, images)
            if logits is not None:
                return [logits[row, : entry.num_classes] for row, entry in enumerate(entries)]
        return super().forward_entries(snapshot, images, entries)

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Capture the graphs of these batch sizes' buckets; on CUDA without graphs, run each size once."""
        if self.graphs is not None:
            self.graphs.warm(batch_sizes)
        elif self.backbone.device.type == "cuda":  # on the CPU nothing compiles or tunes
            size, device = self.backbone.spec.img_size, self.backbone.device
            with self.registry.acquire() as snapshot, torch.inference_mode():
                for batch in sorted(set(batch_sizes)):
                    rows = torch.zeros(batch, dtype=torch.int32, device=device)
                    plan = PrefixPlan.over_tables(snapshot.tables, rows, snapshot.longest_prefix)
                    self.features(plan, torch.zeros(batch, 3, size, size, device=device))

"""What every engine shares: per-row logits from a snapshot, the heads, warm-up.

An engine turns pooled features into per-row logits the same way; engines differ only in how
they compute the features of a mixed-task batch from a registry snapshot. Engines are built by
name with :func:`runtime.engines.make_engine`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from runtime.core.backbone import Backbone
from runtime.core.plan import PrefixPlan
from runtime.core.registry import Snapshot, TaskEntry, TaskRegistry
from runtime.engines.heads import HeadTable, split


class InferenceEngine(ABC):
    """Runs batches of images, each row under its own task, on one backbone and registry."""

    backbone: Backbone
    registry: TaskRegistry

    @abstractmethod
    def features(self, plan: PrefixPlan, images: Tensor) -> Tensor:
        """Final-norm CLS features ``[B, D]``; row ``b`` runs under the task in ``plan.task_of_row[b]``."""

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run each batch size once before serving (kernels compile and tune, graphs capture).

        Called at start and after task loads; engines with nothing to prepare do nothing.
        """
        return None

    def check_batch(self, images: Tensor, entries: Sequence[TaskEntry]) -> None:
        """One image ``[3, S, S]`` per entry, at the backbone's resolution."""
        size = self.backbone.spec.img_size
        expected = (len(entries), 3, size, size)
        if tuple(images.shape) != expected:
            raise ValueError(f"images {tuple(images.shape)} are not {list(expected)}")

    @torch.inference_mode()
    def forward(self, images: Tensor, task_ids: Sequence[str]) -> list[Tensor]:
        """Logits (fp32, on CPU) per row, each from its own task's head; ``images [B, 3, S, S]``."""
        with self.registry.acquire() as snapshot:
            return self.forward_entries(snapshot, images, snapshot.entries(task_ids))

    @torch.inference_mode()
    def forward_entries(
        self, snapshot: Snapshot, images: Tensor, entries: Sequence[TaskEntry]
    ) -> list[Tensor]:
        """``forward`` of rows already resolved to entries, over a snapshot the caller holds.

        The server resolves each request once (``TaskRegistry.hold``) and runs a whole batch on
        one snapshot; an entry older than the snapshot's is still computable while it is held.
        """
        self.check_batch(images, entries)
        if not entries:
            return []
        plan = PrefixPlan.build(snapshot, entries)
        logits = HeadTable.of(snapshot.tables).apply(self.features(plan, images), plan.task_of_row).cpu()
        return split(logits, [entry.num_classes for entry in entries])

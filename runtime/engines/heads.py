"""Task heads on the device, batched: every row through its own task's linear head in one product.

The registry keeps every resident task's head as rows of one pool of class rows, named by a page table
per slot (:class:`runtime.core.registry.SlotTables`). A batch gathers each row's head through the page
table, to the tables' head width ``C`` (a multiple of 16), and runs one fp32 batched product
``[B, 1, D] x [B, D, C] + bias`` (``baddbmm``): each row is its own small product of one shape, so its
logits do not depend on which rows share its batch. On CPU they are bit-identical across batch sizes and
companions, and equal to ``F.linear`` of the row; on CUDA they agree to fp32 rounding. The logits then
cross to the host in one copy per batch and are split per row by each task's class count.

No host sync and no data-dependent shape: a CUDA graph captured over the tables replays any mix of tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.core.registry import SlotTables


@dataclass(frozen=True)
class HeadTable:
    """Heads of all slots: pools ``weight [Rc, D]``, ``bias [Rc]`` (fp32, on the device) and the page table
    ``table [slots, C]`` (int32: the pool row of each slot's class)."""

    weight: Tensor
    bias: Tensor
    table: Tensor

    @classmethod
    def of(cls, tables: SlotTables) -> HeadTable:
        return cls(tables.head_weight, tables.head_bias, tables.head_table)

    def apply(self, features: Tensor, task_of_row: Tensor) -> Tensor:
        """Logits ``[B, C]`` fp32 on the table's device: row ``b`` through slot ``task_of_row[b]``.

        Columns past a row's class count hold products with whatever rows its page table names there.
        """
        rows = self.table.index_select(0, task_of_row.long()).long()  # [B, C]
        batch, width = rows.shape
        weight = self.weight.index_select(0, rows.flatten()).view(batch, width, -1)
        bias = self.bias.index_select(0, rows.flatten()).view(batch, 1, width)
        return torch.baddbmm(bias, features.float().unsqueeze(1), weight.transpose(1, 2)).squeeze(1)


def split(logits: Tensor, class_counts: Sequence[int]) -> list[Tensor]:
    """Row ``b``'s logits ``logits[b, :class_counts[b]]`` (views of ``logits``)."""
    return [logits[row, :count] for row, count in enumerate(class_counts)]

"""The per-batch prefix plan: one snapshot's tables bound to one batch's rows.

Built once per batch (FlashInfer's ``plan()``), read by every layer (``run()``). Its fields carry
the names of the attention contract (:mod:`kernels.reference`), so an engine hands them to a
backend as they are. Every backend, the ONNX engine and the kernel benchmark use this plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from kernels.reference import gather_prefix, prefix_mask
from runtime.core.registry import SlotTables, Snapshot, TaskEntry


@dataclass(frozen=True)
class PrefixPlan:
    """The tables of one batch, their page tables trimmed to ``P`` = the longest prefix it attends over.

    ``prefix_k``/``prefix_v [L, H, R, d]`` and ``prefix_bias [R]`` are the snapshot's pools (not
    copies), ``prefix_table [slots, P]`` int32 and ``prefix_len [slots]`` int32 its page tables,
    ``task_of_row [B]`` int32 the slot of each row's task. ``P`` is the longest prefix of every
    resident task, not of this batch's tasks, so a row's output never depends on which rows share
    its batch.
    """

    task_of_row: Tensor
    prefix_k: Tensor
    prefix_v: Tensor
    prefix_bias: Tensor
    prefix_table: Tensor
    prefix_len: Tensor

    @classmethod
    def build(cls, snapshot: Snapshot, entries: Sequence[TaskEntry]) -> PrefixPlan:
        """The plan of rows ``entries`` (one per row) over ``snapshot``'s tables.

        An entry may be an older version than the snapshot's (a request resolved before its task
        was replaced or evicted): its slot is held by the request, so the tables still hold its rows.
        """
        longest = max([snapshot.longest_prefix, *(entry.prefix_len for entry in entries)])
        slots = [entry.slot for entry in entries]
        task_of_row = torch.tensor(slots, dtype=torch.int32, device=snapshot.tables.prefix_k.device)
        return cls.over_tables(snapshot.tables, task_of_row, longest)

    @classmethod
    def over_tables(cls, tables: SlotTables, task_of_row: Tensor, prefix: int | None = None) -> PrefixPlan:
        """Rows ``task_of_row`` (slots) over the first ``prefix`` positions of the page tables (default:
        all). Over all of them the plan's shapes depend only on the allocation, not on which tasks are
        resident: what a CUDA graph captured against these tables needs.
        """
        prefix = tables.prefix if prefix is None else prefix
        return cls(
            task_of_row=task_of_row,
            prefix_k=tables.prefix_k,
            prefix_v=tables.prefix_v,
            prefix_bias=tables.prefix_bias,
            prefix_table=tables.prefix_table[:, :prefix],
            prefix_len=tables.prefix_len,
        )

    @property
    def longest_prefix(self) -> int:
        return self.prefix_table.shape[1]

    @cached_property
    def rows(self) -> Tensor:
        """``task_of_row`` as an index (int64) for gathers."""
        return self.task_of_row.long()

    def gather(self, layer: int) -> tuple[Tensor, Tensor]:
        """Each row's prefix keys and values at ``layer``: ``[B, H, P, d]`` each (a copy)."""
        return (
            gather_prefix(self.prefix_k[layer], self.prefix_table, self.rows),
            gather_prefix(self.prefix_v[layer], self.prefix_table, self.rows),
        )

    def gather_layers(self) -> tuple[Tensor, Tensor]:
        """Each row's prefix keys and values at every layer: ``[L, B, H, P, d]`` each (a copy)."""
        keys, values = zip(*(self.gather(layer) for layer in range(self.prefix_k.shape[0])), strict=True)
        return torch.stack(keys), torch.stack(values)

    def mask(self, num_tokens: int, dtype: torch.dtype) -> Tensor:
        """Additive mask ``[B, 1, 1, P + num_tokens]`` over ``[prefix ; tokens]`` (see ``prefix_mask``)."""
        return prefix_mask(self.prefix_bias, self.prefix_table, self.prefix_len, self.rows, num_tokens, dtype)

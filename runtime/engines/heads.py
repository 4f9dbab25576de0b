"""Task heads on the device, batched: every row through its own task's linear head in one product.

Each row's head is gathered by its task, padded with zero classes to one width ``C``, and all rows go
through one fp32 batched product ``[B, 1, D] x [B, D, C] + bias`` (``baddbmm``): each row is its own
small product of one shape, so its logits do not depend on which rows share its batch. On CPU they are
bit-identical across batch sizes, companions and widths, and equal to ``F.linear`` of the row (tested
here with widths padded to a multiple of :data:`WIDTH_MULTIPLE`: narrower products take other BLAS
paths); on CUDA they agree to fp32 rounding. The logits then cross to the host in one copy per batch
and are split per row by each task's class count.

:class:`HeadTable` keeps every slot's head in persistent tensors, written when a task loads, so a
captured CUDA graph can replay any mix of loaded tasks; :func:`apply_heads` builds a table of a batch's
own heads for engines that hold no table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

WIDTH_MULTIPLE = 16


class Head(Protocol):
    """A task's linear head, as a registry entry holds it: ``head_weight [C, D]``, ``head_bias [C]``."""

    @property
    def head_weight(self) -> Tensor: ...

    @property
    def head_bias(self) -> Tensor: ...


def padded_width(classes: int) -> int:
    """The product width for heads of up to ``classes`` classes: a positive multiple of WIDTH_MULTIPLE."""
    return max(1, -(-classes // WIDTH_MULTIPLE)) * WIDTH_MULTIPLE


class HeadTable:
    """Heads of all slots: ``weight [slots, C_max, D]`` and ``bias [slots, C_max]`` fp32 on the device,
    zero past each slot's class count; ``class_counts [slots]`` (int64, on the host).

    The registry owns one and writes a task's head into the task's slot at load (:meth:`write`); the
    tensors are never reallocated, so CUDA graphs may read them. A task wider than ``C_max`` or a slot
    past ``slots`` needs a :meth:`grown` copy (and graphs re-captured on it).
    """

    def __init__(self, weight: Tensor, bias: Tensor, class_counts: Tensor) -> None:
        self.weight = weight
        self.bias = bias
        self.class_counts = class_counts

    @classmethod
    def allocate(cls, slots: int, max_classes: int, dim: int, device: torch.device | str) -> HeadTable:
        """An empty table; ``max_classes`` is rounded up to a multiple of :data:`WIDTH_MULTIPLE`."""
        width = padded_width(max_classes)
        return cls(
            weight=torch.zeros(slots, width, dim, dtype=torch.float32, device=device),
            bias=torch.zeros(slots, width, dtype=torch.float32, device=device),
            class_counts=torch.zeros(slots, dtype=torch.int64),
        )

    @property
    def slots(self) -> int:
        return self.weight.shape[0]

    @property
    def max_classes(self) -> int:
        return self.weight.shape[1]

    @property
    def dim(self) -> int:
        return self.weight.shape[2]

    def write(self, slot: int, weight: Tensor, bias: Tensor) -> None:
        """Slot ``slot`` gets the head ``weight [C, D]``, ``bias [C]``; classes past ``C`` become zero."""
        classes = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != self.dim or bias.shape != (classes,):
            shapes = f"{tuple(weight.shape)}, {tuple(bias.shape)}"
            raise ValueError(f"head must be weight [C, {self.dim}] and bias [C], got {shapes}")
        if classes > self.max_classes or not 0 <= slot < self.slots:
            raise ValueError(
                f"a head of {classes} classes in slot {slot} does not fit a table of {self.slots} slots x "
                f"{self.max_classes} classes; grow it first"
            )
        self.weight[slot, :classes] = weight
        self.weight[slot, classes:] = 0
        self.bias[slot, :classes] = bias
        self.bias[slot, classes:] = 0
        self.class_counts[slot] = classes

    def grown(self, slots: int, max_classes: int) -> HeadTable:
        """A new table of at least these sizes holding a copy of this one (this one is left as it is)."""
        bigger = HeadTable.allocate(
            max(slots, self.slots), max(max_classes, self.max_classes), self.dim, self.weight.device
        )
        bigger.weight[: self.slots, : self.max_classes] = self.weight
        bigger.bias[: self.slots, : self.max_classes] = self.bias
        bigger.class_counts[: self.slots] = self.class_counts
        return bigger

    def apply(self, features: Tensor, task_of_row: Tensor) -> Tensor:
        """Logits ``[B, C_max]`` fp32 on the table's device: row ``b`` through slot ``task_of_row[b]``.

        Columns past a row's class count hold its padding (bias 0, weight 0: zeros). No host sync and
        no data-dependent shapes, so it can be captured in a CUDA graph.
        """
        rows = task_of_row.long()
        weight = self.weight.index_select(0, rows)  # [B, C_max, D]
        bias = self.bias.index_select(0, rows)
        product = torch.baddbmm(bias.unsqueeze(1), features.float().unsqueeze(1), weight.transpose(1, 2))
        return product.squeeze(1)


def split(logits: Tensor, class_counts: Sequence[int]) -> list[Tensor]:
    """Row ``b``'s logits ``logits[b, :class_counts[b]]`` (views of ``logits``)."""
    return [logits[row, :count] for row, count in enumerate(class_counts)]


def apply_heads(features: Tensor, entries: Sequence[Head]) -> list[Tensor]:
    """Each row ``features[b]`` (``[B, D]``) through ``entries[b]``'s head: fp32 logits on the host.

    The batch's distinct heads go into a table as wide as its widest head, then one batched product
    and one device-to-host copy.
    """
    if not entries:
        return []
    distinct: dict[int, int] = {}
    heads: list[Head] = []
    for entry in entries:
        if distinct.setdefault(id(entry), len(heads)) == len(heads):
            heads.append(entry)
    weight = heads[0].head_weight
    table = HeadTable.allocate(
        len(heads), max(head.head_weight.shape[0] for head in heads), weight.shape[1], weight.device
    )
    for slot, head in enumerate(heads):
        table.write(slot, head.head_weight, head.head_bias)
    rows = torch.tensor([distinct[id(entry)] for entry in entries], device=weight.device)
    logits = table.apply(features.to(weight.device), rows).cpu()
    return split(logits, [entry.head_weight.shape[0] for entry in entries])

"""Attention backends for the engine: bind a snapshot's prefix tables to one batch, then attend per layer.

Each backend implements the contract of ``kernels.reference``: row ``b`` attends to its task's
prefix (with bias, up to its length) and its own tokens under one softmax.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.reference import prefix_mask
from runtime.core.registry import Snapshot

LayerAttention = Callable[[int, Tensor, Tensor, Tensor], Tensor]
BACKENDS = ("auto", "torch", "triton")


def bind_torch(snapshot: Snapshot, slots: Tensor, num_tokens: int) -> LayerAttention:
    """SDPA over ``[gathered prefix ; tokens]``, the prefix trimmed to the snapshot's longest."""
    rows = slots.long()
    longest = snapshot.longest_prefix
    if longest == 0:
        return lambda layer, q, k, v: F.scaled_dot_product_attention(q, k, v)
    dtype = snapshot.keys.dtype
    mask = prefix_mask(snapshot.bias[:, :longest], snapshot.lengths, rows, num_tokens, dtype)

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        prefix_k = snapshot.keys[layer, :, :, :longest].index_select(0, rows)
        prefix_v = snapshot.values[layer, :, :, :longest].index_select(0, rows)
        keys = torch.cat([prefix_k, k], dim=2)
        values = torch.cat([prefix_v, v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    return attend


def bind_triton(snapshot: Snapshot, slots: Tensor, num_tokens: int) -> LayerAttention:
    """The fused Triton kernel: the prefix is read by row from the tables, never concatenated."""
    from kernels import prefix_attention

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return prefix_attention(
            q, k, v, snapshot.keys[layer], snapshot.values[layer], snapshot.bias, snapshot.lengths, slots
        )

    return attend


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` picks Triton on CUDA when it is importable, PyTorch everywhere else."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    if name != "auto":
        if name == "triton":
            from kernels import triton_available

            if not triton_available():
                raise RuntimeError(
                    "attention backend 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1)"
                )
        return name
    if device.type == "cuda":
        from kernels import triton_available

        if triton_available():
            return "triton"
    return "torch"


BINDERS: dict[str, Callable[[Snapshot, Tensor, int], LayerAttention]] = {
    "torch": bind_torch,
    "triton": bind_triton,
}

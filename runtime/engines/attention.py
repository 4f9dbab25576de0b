"""Attention backends: one batch's prefix data bound once, then called by every layer.

Each backend returns a :data:`LayerAttention`, ``attend(layer, q, k, v) -> out`` with q, k, v and
out ``[B, H, N, d]``, and implements the contract of :mod:`kernels.reference`: row ``b`` attends to
its task's prefix (with bias, up to its length) and its own tokens under one softmax.

* ``torch``: gathers the plan's prefix rows and runs SDPA over ``[prefix ; tokens]`` with an
  additive mask (CPU default; on CUDA the fallback).
* ``triton``: the fused kernel reads each row's prefix from the tables in place (CUDA default).
* ``cascade``: the vendor's SDPA over the tokens, then a kernel merging in the prefix read in place.
* :func:`bind_rows`: each row's prefix handed in directly, as plain MatMul / Add / Softmax: the form
  the ONNX graph exports (the prefixes are graph inputs, not tables).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.core.plan import PrefixPlan

LayerAttention = Callable[[int, Tensor, Tensor, Tensor], Tensor]
Binder = Callable[[PrefixPlan, int], LayerAttention]
BACKENDS = ("auto", "torch", "triton", "cascade")
KERNELS = ("triton", "cascade")  # backends of the kernels package, which need triton


def bind_torch(plan: PrefixPlan, num_tokens: int) -> LayerAttention:
    """SDPA over ``[gathered prefix ; tokens]`` with the plan's additive mask."""
    if plan.longest_prefix == 0:
        return lambda layer, q, k, v: F.scaled_dot_product_attention(q, k, v)
    mask = plan.mask(num_tokens, plan.prefix_k.dtype)

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        prefix_k, prefix_v = plan.gather(layer)
        keys = torch.cat([prefix_k, k], dim=2)
        values = torch.cat([prefix_v, v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    return attend


def bind_kernel(name: str) -> Binder:
    """A binder for the kernels package's backend ``name``: the prefix is read by row from the tables."""

    def bind(plan: PrefixPlan, num_tokens: int) -> LayerAttention:
        from kernels import attention_backend

        kernel = attention_backend(name)

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return kernel(
                q,
                k,
                v,
                plan.prefix_k[layer],
                plan.prefix_v[layer],
                plan.prefix_bias,
                plan.prefix_table,
                plan.prefix_len,
                plan.task_of_row,
            )

        return attend

    return bind


def bind_rows(
    prefix_keys: Tensor, prefix_values: Tensor, prefix_mask: Tensor, num_tokens: int, head_dim: int
) -> LayerAttention:
    """Each row's own prefix: keys/values ``[L, B, H, P, d]`` and an additive mask ``[B, P]``.

    Written as explicit matmuls and a softmax (not SDPA) so that the exported graph has the
    pattern ONNX Runtime folds into ``FusedMatMul``: a constant score scale (hence ``head_dim`` as
    a Python number, not read from a traced shape) and the key transpose.
    """
    scale = 1.0 / math.sqrt(head_dim)
    tokens = prefix_mask.new_zeros(prefix_mask.shape[0], num_tokens)
    mask = torch.cat([prefix_mask, tokens], dim=1)[:, None, None, :]

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys = torch.cat([prefix_keys[layer], k], dim=2)
        values = torch.cat([prefix_values[layer], v], dim=2)
        logits = (q * scale) @ keys.transpose(-1, -2) + mask
        return logits.softmax(dim=-1) @ values

    return attend


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` picks the fused Triton kernel on CUDA when triton imports, PyTorch everywhere else."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    if name != "auto":
        if name in KERNELS:
            from kernels import triton_available

            if not triton_available():
                raise RuntimeError(
                    f"attention backend {name!r} needs triton and a CUDA device (or TRITON_INTERPRET=1)"
                )
        return name
    if device.type == "cuda":
        from kernels import triton_available

        if triton_available():
            return "triton"
    return "torch"


BINDERS: dict[str, Binder] = {"torch": bind_torch, **{name: bind_kernel(name) for name in KERNELS}}

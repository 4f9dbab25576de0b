"""Attention kernels over a per-row task prefix read from a paged pool.

The contract (:mod:`kernels.reference` has it in full)::

    out = prefix_attention(q, k, v, prefix_k, prefix_v, prefix_bias, prefix_table, prefix_len, task_of_row)

q, k, v ``[B, H, N, d]``; prefix_k, prefix_v one layer's pool of prefix rows ``[H, R, d]``; prefix_bias
``[R]``; prefix_table ``[slots, P]`` (pool row of each slot's j-th prefix position, vLLM's block table
with block size 1); prefix_len ``[slots]``; task_of_row ``[B]``. Row ``b`` attends, under one softmax,
to the pool rows its slot's table names up to the slot's length, then to its own tokens.

``prefix_attention_reference`` is the plain per-row oracle (``prefix_attention_cascade_reference``
computes it as tokens and prefix apart, merged; ``gather_prefix`` and ``prefix_mask`` give the padded
batched form the runtime's PyTorch backend feeds to SDPA). Two Triton backends implement it, each
imported on first call so that importing :mod:`kernels` never imports :mod:`triton` (check
:func:`triton_available` first; the ``triton_*`` modules are the only ones importing it):

* ``"triton"``, :func:`prefix_attention`: one fused kernel streaming the prefix and the tokens.
* ``"cascade"``, :func:`prefix_attention_cascade`: the vendor's SDPA (cuDNN) over the tokens with its
  log-sum-exp, then a fused prefix-and-merge kernel.

:func:`attention_backend` maps these names (and ``"reference"``) to the functions.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

from kernels.reference import (
    gather_prefix,
    prefix_attention_cascade_reference,
    prefix_attention_reference,
    prefix_mask,
)

__all__ = [
    "BACKENDS",
    "attention_backend",
    "gather_prefix",
    "prefix_attention",
    "prefix_attention_cascade",
    "prefix_attention_cascade_reference",
    "prefix_attention_reference",
    "prefix_mask",
    "triton_available",
]

PrefixAttention = Callable[..., Tensor]


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # a broken install can fail beyond ImportError
        return False
    return True


def triton_available() -> bool:
    """True when triton imports and can run: on a CUDA device, or in its CPU interpreter.

    The interpreter is selected by ``TRITON_INTERPRET=1``, which must be set before
    :mod:`kernels.triton_prefix` is first imported.
    """
    if not _triton_imports():
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_bias: Tensor,
    prefix_table: Tensor,
    prefix_len: Tensor,
    task_of_row: Tensor,
    scale: float | None = None,
) -> Tensor:
    """The fused Triton kernel (see :mod:`kernels.triton_prefix`); same contract as the reference."""
    from kernels.triton_prefix import prefix_attention as kernel

    return kernel(q, k, v, prefix_k, prefix_v, prefix_bias, prefix_table, prefix_len, task_of_row, scale)


def prefix_attention_cascade(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_bias: Tensor,
    prefix_table: Tensor,
    prefix_len: Tensor,
    task_of_row: Tensor,
    scale: float | None = None,
) -> Tensor:
    """Vendor SDPA + prefix-and-merge kernel (see :mod:`kernels.triton_cascade`); same contract."""
    from kernels.triton_cascade import prefix_attention_cascade as cascade

    return cascade(q, k, v, prefix_k, prefix_v, prefix_bias, prefix_table, prefix_len, task_of_row, scale)


BACKENDS: dict[str, PrefixAttention] = {
    "reference": prefix_attention_reference,
    "triton": prefix_attention,
    "cascade": prefix_attention_cascade,
}


def attention_backend(name: str) -> PrefixAttention:
    """The contract's implementation called ``name`` (one of :data:`BACKENDS`)."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown prefix attention backend {name!r}; choose from {sorted(BACKENDS)}"
        ) from None

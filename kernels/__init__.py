"""Attention kernels over a per-row task prefix.

``prefix_attention_reference`` is the pure-PyTorch contract; ``prefix_attention`` is the Triton
kernel, imported on first call so that importing :mod:`kernels` never imports :mod:`triton`
(check :func:`triton_available` first).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from kernels.reference import prefix_attention_reference, prefix_mask

__all__ = ["prefix_attention", "prefix_attention_reference", "prefix_mask", "triton_available"]


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
    prefix_len: Tensor,
    task_of_row: Tensor,
    scale: float | None = None,
) -> Tensor:
    """The Triton kernel (see :mod:`kernels.triton_prefix`); same contract as the reference."""
    from kernels.triton_prefix import prefix_attention as kernel

    return kernel(q, k, v, prefix_k, prefix_v, prefix_bias, prefix_len, task_of_row, scale)

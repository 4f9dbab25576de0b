"""Each row's attention over its own tokens with the softmax log-sum-exp, from the vendor's SDPA kernel.

The cascade backend (:mod:`kernels.triton_cascade`) takes the token part of the attention from here and
merges the prefix into it. PyTorch exposes the log-sum-exp only through private ``aten`` operators, whose
output layout is not a documented contract. Assumed (read from PyTorch's sources, not verifiable without
a GPU here): the output is ``[B, H, N, d]`` in q's dtype with any strides; the log-sum-exp is of the
*scaled* logits, in natural log, fp32, shaped ``[B, H, N]``, ``[B, H, N, 1]`` (cuDNN) or ``[B, H, N']``
with ``N' >= N`` padded (memory-efficient kernel). So that a wrong assumption can never reach a request,
the first call per (device, dtype, H, N, d) checks each candidate kernel against
:func:`kernels.reference.token_attention_reference` on a small random batch of the same shape and keeps
the first that agrees: cuDNN, then FlashAttention-2, then memory-efficient on CUDA; the CPU flash kernel
on CPU; plain PyTorch (always correct, slowest) if none does.

That check synchronizes the device, so a CUDA graph must be captured after one eager call of the shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from kernels.reference import token_attention_reference

__all__ = ["token_attention", "token_backend"]

TokenAttention = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
_log = logging.getLogger(__name__)


def _cudnn(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=scale)
    return out, lse


def _flash(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)
    return out, lse


def _efficient(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)
    return out, lse


def _cpu_flash(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    return out, lse


def _math(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = token_attention_reference(q, k, v, scale)
    return out.to(q.dtype), lse


KERNELS: dict[str, TokenAttention] = {
    "cudnn": _cudnn,
    "flash": _flash,
    "efficient": _efficient,
    "cpu_flash": _cpu_flash,
    "math": _math,
}
CANDIDATES = {"cuda": ("cudnn", "flash", "efficient"), "cpu": ("cpu_flash",)}
# Vendor vs fp32 reference on the same inputs: output rounding of q's dtype; the lse is fp32 in both.
_OUT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
_LSE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}

_Key = tuple[torch.device, torch.dtype, int, int, int]
_chosen: dict[_Key, str] = {}


def _as_bhn(lse: Tensor, batch: int, heads: int, tokens: int) -> Tensor:
    """A vendor log-sum-exp as ``[B, H, N]`` fp32 (a view where possible)."""
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse.squeeze(-1)
    if lse.dim() != 3 or lse.shape[:2] != (batch, heads) or lse.shape[2] < tokens:
        raise ValueError(f"log-sum-exp of shape {tuple(lse.shape)} is not [{batch}, {heads}, >= {tokens}]")
    return lse[:, :, :tokens].float()


def _agrees(name: str, key: _Key) -> bool:
    """Whether kernel ``name`` matches the reference on a random batch of 2 rows of ``key``'s shape."""
    device, dtype, heads, tokens, head_dim = key
    gen = torch.Generator().manual_seed(0)
    # Strided views of a fused [B, N, 3, H, d] projection, as the runtime passes q, k, v.
    qkv = torch.randn(2, tokens, 3, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = 0.7 / math.sqrt(head_dim)  # not the default, so a kernel that ignores it fails
    expected_out, expected_lse = token_attention_reference(q, k, v, scale)
    try:
        out, lse = KERNELS[name](q, k, v, scale)
        lse = _as_bhn(lse, 2, heads, tokens)
        torch.testing.assert_close(
            out.float(), expected_out, atol=_OUT_TOLERANCE[dtype], rtol=_OUT_TOLERANCE[dtype]
        )
        torch.testing.assert_close(lse, expected_lse, atol=_LSE_TOLERANCE[dtype], rtol=_LSE_TOLERANCE[dtype])
    except (RuntimeError, ValueError, NotImplementedError, AssertionError) as error:
        _log.info("token attention %r rejected for %s: %s", name, key, str(error).splitlines()[0])
        return False
    return True


def _choose(key: _Key) -> str:
    device = key[0]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"token attention for {key} is not checked yet; run one eager call of this shape before capture"
        )
    name = next((name for name in CANDIDATES.get(device.type, ()) if _agrees(name, key)), "math")
    if name == "math":
        _log.warning("no vendor attention kernel with log-sum-exp agrees for %s; using plain PyTorch", key)
    _chosen[key] = name
    return name


def token_backend(q: Tensor) -> str:
    """Name of the kernel :func:`token_attention` uses for ``q``'s device, dtype and shape."""
    _, heads, tokens, head_dim = q.shape
    key = (q.device, q.dtype, heads, tokens, head_dim)
    return _chosen.get(key) or _choose(key)


def token_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Output ``[B, H, N, d]`` (q's dtype, the kernel's strides) and fp32 log-sum-exp ``[B, H, N]``.

    q, k, v ``[B, H, N, d]`` with unit stride in ``d``; natural-log log-sum-exp of the scaled logits.
    """
    batch, heads, tokens, _ = q.shape
    out, lse = KERNELS[token_backend(q)](q, k, v, scale)
    return out, _as_bhn(lse, batch, heads, tokens)

"""Triton kernel: attention over a per-row task prefix, read from a paged pool, without concatenation.

Row ``b`` of the batch belongs to slot ``t = task_of_row[b]`` and attends, with a single softmax, to
the keys ``[prefix_k[:, prefix_table[t, :prefix_len[t]]] ; k[b]]`` (see :mod:`kernels.reference` for the
contract). The obvious implementation gathers the prefix of every row and concatenates it with the row's
own keys and values, materialising a ``[B, H, P + N, d]`` tensor per layer. This kernel never builds it:
each program (one query block of one head of one row) reads the row's slot, walks that slot's table row
up to the slot's own prefix length, a block of pool-row indices at a time, gathers those rows' keys,
values and biases straight from the pool, then streams the row's own keys/values, folding both sources
into one online ("flash") softmax, as in the Triton tutorial 06-fused-attention.

Online softmax, per query row, over key blocks ``j = 1, 2, ...`` with logits ``s_j``::

    m_j   = max(m_{j-1}, max(s_j))                  running maximum
    alpha = 2^(m_{j-1} - m_j)                       rescales what was accumulated so far
    p_j   = 2^(s_j - m_j)
    l_j   = alpha * l_{j-1} + sum(p_j)              running softmax denominator
    acc_j = alpha * acc_{j-1} + p_j @ v_j           running numerator
    out   = acc_last / l_last

The logits are kept in base 2 (``log2(e)`` folded into the scale and into the prefix bias) so the
exponentials are ``exp2``, which maps to a single hardware instruction. Masked slots have logit
``-inf``; a block whose slots are all masked would give ``m_j = -inf`` and ``-inf - -inf = NaN``, so
the maximum used for the exponentials is clamped to 0 in that case (every ``p`` is then exactly 0).

This module and :mod:`kernels.triton_cascade` (which reuses :func:`attend_block`) are the only ones
importing :mod:`triton`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.launch_configs import LaunchConfig, device_capability, prefix_config

__all__ = ["check_contract", "prefix_attention"]

LOG2E_HOST = 1.4426950408889634  # log2(e) on the host: e^x == 2^(x * log2(e))
LOG2E: tl.constexpr = tl.constexpr(LOG2E_HOST)  # the same constant, visible inside kernels
HEAD_DIMS = (32, 64, 80, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def attend_block(
    acc,
    l_i,
    m_i,
    q,
    kt_ptrs,
    kt_mask,
    v_ptrs,
    v_mask,
    logit_bias,
    qk_scale,
    INPUT_PRECISION: tl.constexpr,
):
    """Fold one block of keys/values into the running softmax state of a query block.

    ``logit_bias`` (``[BLOCK_N]``, base 2) carries the prefix bias and ``-inf`` on masked key slots,
    whose K/V loads are masked to zeros.
    """
    kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0).to(q.dtype)  # [BLOCK_D, BLOCK_N]: K transposed
    s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale + logit_bias[None, :]  # base-2 logits
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Guard: a fully masked block leaves m_new == -inf; exponentiating against 0 instead gives p == 0
    # and alpha == 2^(m_i - 0) == 0 (m_i is -inf too) rather than NaN from -inf - -inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=v_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def attend_prefix(
    acc, l_i, m_i, q,
    table_base, stride_tp,
    pk_base, stride_pkr, stride_pkd,
    pv_base, stride_pvr, stride_pvd,
    PBIAS, stride_pb,
    plen, offs_n, offs_d, d_mask, qk_scale,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold one slot's prefix into the softmax state: its first ``plen`` table entries name pool rows.

    Each step loads BLOCK_N pool-row indices from the slot's table row, then gathers those rows' keys,
    values and biases (``*_base`` already point at this head). Logit = q.k * scale + bias[row], in base
    2; positions at or past ``plen`` are ``-inf`` and their table entries are never read. Shared by the
    fused kernel (its first pass) and the cascade's merge kernel (after the token part).
    """
    for start_n in range(0, plen, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < plen
        rows = tl.load(table_base + cols * stride_tp, mask=col_ok, other=0).to(tl.int64)
        bias = tl.load(PBIAS + rows * stride_pb, mask=col_ok, other=0.0).to(tl.float32)
        logit_bias = tl.where(col_ok, bias * LOG2E, float("-inf"))
        kt_ptrs = pk_base + rows[None, :] * stride_pkr + offs_d[:, None] * stride_pkd
        v_ptrs = pv_base + rows[:, None] * stride_pvr + offs_d[None, :] * stride_pvd
        acc, l_i, m_i = attend_block(
            acc, l_i, m_i, q,
            kt_ptrs, col_ok[None, :] & d_mask[:, None],
            v_ptrs, col_ok[:, None] & d_mask[None, :],
            logit_bias, qk_scale, INPUT_PRECISION,
        )  # fmt: skip
    return acc, l_i, m_i


# P (the table's width) follows the loaded tasks; not specializing on it keeps one compiled variant.
@triton.jit(do_not_specialize=["P"])
def _prefix_attention_kernel(
    Q, K, V, PK, PV, PBIAS, TABLE, PLEN, TASK, Out,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkh, stride_pkr, stride_pkd,
    stride_pvh, stride_pvr, stride_pvd,
    stride_pb,
    stride_tt, stride_tp,
    stride_ob, stride_oh, stride_on, stride_od,
    qk_scale,
    H,
    N_CTX,
    P,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program = one block of BLOCK_M queries of one head of one batch row."""
    # A flat 1-D grid (axis 0 allows 2^31 - 1 programs; axis 1 only 65535), query blocks fastest so
    # the programs sharing one (row, head)'s K/V run back to back and hit it in L2.
    num_m = tl.cdiv(N_CTX, BLOCK_M)
    start_m = tl.program_id(0) % num_m
    off_bh = tl.program_id(0) // num_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    # The row's slot selects its table row and length; the loop below runs over that length only.
    task = tl.load(TASK + off_b).to(tl.int64)
    plen = tl.minimum(tl.load(PLEN + task), P)  # a length past the table's width would read beyond it

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    # Head dims such as 80 are padded to the next power of two; the padding lanes load zeros, which
    # add nothing to q.k and produce output columns that are never stored.
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh
    q_ptrs += offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < N_CTX) & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Pass 1: the slot's prefix, gathered from the pool through its table row.
    acc, l_i, m_i = attend_prefix(
        acc, l_i, m_i, q,
        TABLE + task * stride_tt, stride_tp,
        PK + off_h * stride_pkh, stride_pkr, stride_pkd,
        PV + off_h * stride_pvh, stride_pvr, stride_pvd,
        PBIAS, stride_pb,
        plen, offs_n, offs_d, d_mask, qk_scale, BLOCK_N, INPUT_PRECISION,
    )  # fmt: skip

    # Pass 2: the row's own tokens, no bias; only the tail of the last block is masked.
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    for start_n in range(0, N_CTX, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < N_CTX
        logit_bias = tl.where(col_ok, 0.0, float("-inf"))
        kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        acc, l_i, m_i = attend_block(
            acc, l_i, m_i, q,
            kt_ptrs, col_ok[None, :] & d_mask[:, None],
            v_ptrs, col_ok[:, None] & d_mask[None, :],
            logit_bias, qk_scale, INPUT_PRECISION,
        )  # fmt: skip

    # Every row has N_CTX >= 1 unmasked token keys, so l_i > 0 here.
    acc = acc / l_i[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh
    o_ptrs += offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < N_CTX) & d_mask[None, :])


def check_contract(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_bias: Tensor,
    prefix_table: Tensor,
    prefix_len: Tensor,
    task_of_row: Tensor,
) -> None:
    """Raise ``ValueError`` unless the inputs fit the attention contract and the kernels' limits.

    Checks shapes, dtypes and devices only: reading the indices' values would synchronize the device.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, H, N, d] shape, got {q.shape}, {k.shape}, {v.shape}")
    batch, heads, n_ctx, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported (expected one of {HEAD_DIMS})")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype among {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if prefix_k.dim() != 3 or prefix_k.shape[::2] != (heads, head_dim) or prefix_v.shape != prefix_k.shape:
        raise ValueError(
            f"prefix_k/prefix_v must be one pool [{heads}, R, {head_dim}], "
            f"got {tuple(prefix_k.shape)}, {tuple(prefix_v.shape)}"
        )
    if prefix_k.dtype not in DTYPES or prefix_v.dtype != prefix_k.dtype:
        raise ValueError(
            f"prefix_k/prefix_v must share a dtype among {DTYPES}, got {prefix_k.dtype}, {prefix_v.dtype}"
        )
    if prefix_table.dim() != 2:
        raise ValueError(f"prefix_table must be [slots, P], got {tuple(prefix_table.shape)}")
    (slots, _), pool_rows = prefix_table.shape, prefix_k.shape[1]
    if prefix_bias.shape != (pool_rows,) or prefix_len.shape != (slots,) or task_of_row.shape != (batch,):
        raise ValueError(
            f"expected prefix_bias [{pool_rows}], prefix_len [{slots}], task_of_row [{batch}]; got "
            f"{tuple(prefix_bias.shape)}, {tuple(prefix_len.shape)}, {tuple(task_of_row.shape)}"
        )
    if not prefix_bias.is_floating_point():
        raise ValueError(f"prefix_bias must be floating point (fp32), got {prefix_bias.dtype}")
    for name, index in (
        ("prefix_table", prefix_table),
        ("prefix_len", prefix_len),
        ("task_of_row", task_of_row),
    ):
        if index.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {index.dtype}")
    inputs = (k, v, prefix_k, prefix_v, prefix_bias, prefix_table, prefix_len, task_of_row)
    if any(tensor.device != q.device for tensor in inputs):
        raise ValueError(
            f"every input must be on q's device {q.device}, got {[str(t.device) for t in inputs]}"
        )
    if n_ctx == 0:
        raise ValueError("attention needs at least one token per row")


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
    """Attention of every row over its slot's prefix followed by its own tokens, in one pass.

    Same contract as :func:`kernels.reference.prefix_attention_reference`. Shapes: q, k, v
    ``[B, H, N, d]`` (any strides, e.g. views of a fused qkv projection); prefix_k, prefix_v the pool
    ``[H, R, d]`` (any strides); prefix_bias ``[R]``; prefix_table ``[slots, P]``; prefix_len
    ``[slots]``; task_of_row ``[B]`` (index tensors int32 or int64, read as they are). ``d`` must be
    one of 32, 64, 80, 128; inputs fp16, bf16 or fp32 (the pool is cast to q's dtype on load).
    Returns a contiguous ``[B, H, N, d]`` tensor in q's dtype. Softmax statistics and accumulation
    are fp32. No host synchronization and no shape depends on the indices' values, so the call can
    be captured in a CUDA graph. The launch configuration is fixed per (GPU, head dim, dtype, batch,
    P) by :func:`kernels.launch_configs.prefix_config`.
    """
    check_contract(q, k, v, prefix_k, prefix_v, prefix_bias, prefix_table, prefix_len, task_of_row)
    batch, heads, n_ctx, head_dim = q.shape
    width = prefix_table.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty((batch, heads, n_ctx, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    config = prefix_config(device_capability(q.device), head_dim, q.dtype, batch, width)
    grid = (triton.cdiv(n_ctx, config.block_m) * batch * heads,)
    _prefix_attention_kernel[grid](
        q, k, v, prefix_k, prefix_v, prefix_bias, prefix_table, prefix_len, task_of_row, out,
        *q.stride(), *k.stride(), *v.stride(),
        *prefix_k.stride(), *prefix_v.stride(), *prefix_bias.stride(), *prefix_table.stride(),
        *out.stride(),
        scale * LOG2E_HOST,
        heads,
        n_ctx,
        width,
        **launch_options(config, head_dim, q.dtype),
    )  # fmt: skip
    return out


def launch_options(config: LaunchConfig, head_dim: int, dtype: torch.dtype) -> dict[str, Any]:
    """The compile-time options both kernels are launched with: head dim, precision, fixed blocks."""
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": triton.next_power_of_2(head_dim),
        "INPUT_PRECISION": input_precision(dtype),
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }


def input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (no TF32) so they match the fp32 reference."""
    return "ieee" if dtype == torch.float32 else "tf32"

"""Cascade prefix attention: the vendor's SDPA over the row's tokens, then a fused prefix-and-merge kernel.

cuDNN attention over a row's own N tokens is the floor of this layer; a per-row prefix gathered from a
paged pool, with a bias and a length mask, takes every SDPA kernel off its fast path. So the two parts
are computed apart and merged exactly (the cascade of FlashInfer's ``merge_state``):

1. :func:`kernels.token_attention.token_attention`: ``out_t`` and its log-sum-exp ``lse_t`` from the
   vendor kernel (cuDNN on an H100).
2. :func:`_prefix_merge_kernel`, one program per block of BLOCK_M queries of one head of one row: the
   token part enters the online softmax as one pseudo-key whose base-2 logit is ``lse_t * log2(e)``
   and whose value is ``out_t`` (running state ``m = lse_t * log2(e)``, ``l = 1``, ``acc = out_t``);
   the slot's prefix is then folded in, gathered from the pool through its table row up to the slot's
   own length, with the fused kernel's own step (:func:`kernels.triton_prefix.attend_prefix`), and
   ``acc / l`` is written over ``out_t`` in place. This is
   ``(e^lse_t out_t + sum_j e^s_j v_j) / (e^lse_t + sum_j e^s_j)``: the single softmax over
   ``[prefix ; tokens]``. An empty or fully masked prefix leaves ``out_t`` as it was.

The merge reads q and ``out_t`` once and writes the output once; the prefix keys/values are a few
blocks of pool rows per task, shared by all rows of the task and the batch, and stay in L2.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from torch import Tensor

from kernels.launch_configs import cascade_config, device_capability
from kernels.token_attention import token_attention
from kernels.triton_prefix import LOG2E, LOG2E_HOST, attend_prefix, check_contract, launch_options

__all__ = ["prefix_attention_cascade"]


@triton.jit(do_not_specialize=["P"])
def _prefix_merge_kernel(
    Q, PK, PV, PBIAS, TABLE, PLEN, TASK, Out, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_pkh, stride_pkr, stride_pkd,
    stride_pvh, stride_pvr, stride_pvd,
    stride_pb,
    stride_tt, stride_tp,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
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
    """One program = one block of BLOCK_M queries of one head of one batch row; ``Out`` is merged in place."""
    num_m = tl.cdiv(N_CTX, BLOCK_M)  # flat grid, query blocks fastest, as in the fused kernel
    start_m = tl.program_id(0) % num_m
    off_bh = tl.program_id(0) // num_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    task = tl.load(TASK + off_b).to(tl.int64)
    plen = tl.minimum(tl.load(PLEN + task), P)  # as in the fused kernel: never read past the table

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_ok = offs_m < N_CTX
    tile_mask = row_ok[:, None] & d_mask[None, :]

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh
    q = tl.load(q_ptrs + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=tile_mask, other=0.0)
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh
    o_ptrs += offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    lse_ptrs = LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ln

    # The token part as the running state of an online softmax (base 2): one pseudo-key of weight 1.
    m_i = tl.load(lse_ptrs, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
    l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.load(o_ptrs, mask=tile_mask, other=0.0).to(tl.float32)

    acc, l_i, m_i = attend_prefix(
        acc, l_i, m_i, q,
        TABLE + task * stride_tt, stride_tp,
        PK + off_h * stride_pkh, stride_pkr, stride_pkd,
        PV + off_h * stride_pvh, stride_pvr, stride_pvd,
        PBIAS, stride_pb,
        plen, offs_n, offs_d, d_mask, qk_scale, BLOCK_N, INPUT_PRECISION,
    )  # fmt: skip

    # l_i >= the token part's weight 2^(lse - m) > 0.
    tl.store(o_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=tile_mask)


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
    """The contract of :func:`kernels.reference.prefix_attention_reference`, as vendor SDPA + merge.

    Shapes, dtypes and head dims as :func:`kernels.triton_prefix.prefix_attention`; q, k, v need unit
    stride in ``d``. Returns ``[B, H, N, d]`` in q's dtype with the vendor output's strides (cuDNN and
    the CPU kernel lay it out as ``[B, N, H, d]``, which makes the engine's ``transpose(1, 2).reshape``
    free). Runs on CUDA (cuDNN / flash token part) and in Triton's CPU interpreter (CPU flash token
    part). The first call per (device, dtype, H, N, d) checks the token kernel and synchronizes: call
    once eagerly before capturing a CUDA graph (see :mod:`kernels.token_attention`).
    """
    check_contract(q, k, v, prefix_k, prefix_v, prefix_bias, prefix_table, prefix_len, task_of_row)
    batch, heads, n_ctx, head_dim = q.shape
    width = prefix_table.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out, lse = token_attention(q, k, v, scale)
    if batch == 0 or width == 0:  # no prefix at all: the token part is the answer
        return out
    config = cascade_config(device_capability(q.device), q.dtype, width)
    grid = (triton.cdiv(n_ctx, config.block_m) * batch * heads,)
    _prefix_merge_kernel[grid](
        q, prefix_k, prefix_v, prefix_bias, prefix_table, prefix_len, task_of_row, out, lse,
        *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *prefix_bias.stride(),
        *prefix_table.stride(), *out.stride(), *lse.stride(),
        scale * LOG2E_HOST,
        heads,
        n_ctx,
        width,
        **launch_options(config, head_dim, q.dtype),
    )  # fmt: skip
    return out

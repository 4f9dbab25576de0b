"""Pure-PyTorch reference for attention over a per-row task prefix read from a paged pool.

The attention contract every backend implements::

    out = prefix_attention(q, k, v, prefix_k, prefix_v, prefix_bias, prefix_table, prefix_len, task_of_row)

    q, k, v        [B, H, N, d]      the rows' own queries, keys, values (any strides)
    prefix_k/_v    [H, R, d]         one layer's pool of prefix rows of all tasks (any strides)
    prefix_bias    [R] fp32          additive logit bias of each pool row
    prefix_table   [slots, P] int32  pool row of each slot's j-th prefix position (P may be 0)
    prefix_len     [slots] int32     prefix length of each slot, <= P
    task_of_row    [B] int32/int64   slot of each row

The pool is paged with one pool row per prefix row (vLLM's block table with block size 1), so tasks of
different prefix lengths waste no memory. Row ``b`` of slot ``t = task_of_row[b]`` attends, with one
softmax, to the keys ``[prefix_k[:, prefix_table[t, :prefix_len[t]]] ; k[b]]``; the logit of prefix
key ``j`` is raised by ``prefix_bias[prefix_table[t, j]]`` (``ln c`` for a "null" row that stands for
``c`` identical pruned prompts, else 0). Table entries at ``j >= prefix_len[t]`` are ignored. Nothing
assumes that the rows of different slots are disjoint, contiguous or in order.

:func:`prefix_attention_reference` is the oracle, written as plainly as possible: each row
concatenates exactly its own prefix rows. :func:`gather_prefix` and :func:`prefix_mask` give the
padded, batched form (every row's table gathered to width ``P`` and an additive mask), which the
runtime's PyTorch backend feeds to SDPA.

The same softmax can be computed in two parts and merged exactly (the cascade of FlashInfer's
``merge_state``): attention over the row's tokens alone with its log-sum-exp ``lse_t``, attention over the
prefix alone with ``lse_p``, then ``out = w_t * out_t + w_p * out_p`` with ``w = exp(lse - logaddexp(lse_t,
lse_p))``. :func:`prefix_attention_cascade_reference` does that in plain PyTorch, over the padded form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gather_prefix(pool: Tensor, prefix_table: Tensor, task_of_row: Tensor) -> Tensor:
    """Each row's prefix ``[B, H, P, d]`` copied from a pool ``[H, R, d]`` through its slot's table row.

    Positions at or past a row's prefix length hold whatever pool row the table names there.
    """
    index = prefix_table.index_select(0, task_of_row.long()).long()  # [B, P] pool rows
    rows = pool.index_select(1, index.reshape(-1))  # [H, B * P, d]
    return rows.unflatten(1, tuple(index.shape)).transpose(0, 1)


def prefix_mask(
    prefix_bias: Tensor,
    prefix_table: Tensor,
    prefix_len: Tensor,
    task_of_row: Tensor,
    num_tokens: int,
    dtype: torch.dtype,
) -> Tensor:
    """Additive mask ``[B, 1, 1, P + num_tokens]`` over ``[gather_prefix(...) ; tokens]``.

    The bias of the named pool row on a row's valid prefix positions, ``-inf`` past its prefix length,
    0 on its tokens.
    """
    slots = task_of_row.long()
    index = prefix_table.index_select(0, slots).long()  # [B, P]
    bias = prefix_bias.index_select(0, index.reshape(-1)).view(index.shape).to(dtype)
    positions = torch.arange(index.shape[1], device=index.device)
    past = positions[None, :] >= prefix_len.index_select(0, slots)[:, None]
    bias = bias.masked_fill(past, float("-inf"))
    tokens = torch.zeros(bias.shape[0], num_tokens, dtype=dtype, device=bias.device)
    return torch.cat([bias, tokens], dim=1)[:, None, None, :]


def prefix_attention_reference(
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
    """The contract, one row at a time: its own prefix rows concatenated with its tokens, fp32 softmax.

    Shapes as in the module docstring; returns ``[B, H, N, d]`` in q's dtype. Reads the indices on the
    host: an oracle, not for CUDA graphs.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, slot in enumerate(task_of_row.tolist()):
        rows = prefix_table[slot, : int(prefix_len[slot])].long()
        keys = torch.cat([prefix_k[:, rows], k[b]], dim=1).float()  # [H, p + N, d]
        values = torch.cat([prefix_v[:, rows], v[b]], dim=1).float()
        bias = torch.cat([prefix_bias[rows].float(), keys.new_zeros(k.shape[2])])
        logits = q[b].float() @ keys.transpose(-1, -2) * scale + bias  # [H, N, p + N]
        out[b] = logits.softmax(dim=-1) @ values
    return out.to(q.dtype)


def token_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Each row over its own tokens only: fp32 output ``[B, H, N, d]`` and log-sum-exp ``[B, H, N]``.

    The log-sum-exp is of the scaled logits, in natural log, as the vendor SDPA kernels return it.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q.float() @ k.float().transpose(-1, -2) * scale
    lse = logits.logsumexp(dim=-1)
    return (logits - lse[..., None]).exp() @ v.float(), lse


def prefix_part_reference(
    q: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_bias: Tensor,
    prefix_table: Tensor,
    prefix_len: Tensor,
    task_of_row: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Each row over its prefix only: fp32 output and log-sum-exp (see ``token_attention_reference``).

    A row whose prefix is empty or fully masked has ``lse = -inf`` and output 0: it adds nothing to a merge.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = prefix_mask(prefix_bias.float(), prefix_table, prefix_len, task_of_row, 0, torch.float32)
    keys = gather_prefix(prefix_k, prefix_table, task_of_row).float()
    logits = q.float() @ keys.transpose(-1, -2) * scale + mask
    lse = logits.logsumexp(dim=-1)
    weights = (logits - lse.nan_to_num(neginf=0.0)[..., None]).exp()  # all -inf -> exp(-inf) = 0, no NaN
    return weights @ gather_prefix(prefix_v, prefix_table, task_of_row).float(), lse


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Attention over the union of two disjoint key sets from each set's output and log-sum-exp.

    ``lse_a`` must be finite (a row's own tokens); ``lse_b`` may be ``-inf`` (no prefix).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - lse).exp()[..., None] + out_b * (lse_b - lse).exp()[..., None]


def prefix_attention_cascade_reference(
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
    """The contract computed as tokens and prefix apart, then merged; equal to the reference in fp32."""
    out_t, lse_t = token_attention_reference(q, k, v, scale)
    out_p, lse_p = prefix_part_reference(
        q, prefix_k, prefix_v, prefix_bias, prefix_table, prefix_len, task_of_row, scale
    )
    return merge_attention_states(out_t, lse_t, out_p, lse_p).to(q.dtype)

"""Pure-PyTorch reference for attention over a per-row task prefix.

The attention contract every backend implements::

    out = prefix_attention(q, k, v, prefix_k, prefix_v, prefix_bias, prefix_len, task_of_row)

Row ``b`` attends, with one softmax, to the keys ``[prefix_k[t, :, :prefix_len[t]] ; k[b]]``
where ``t = task_of_row[b]``. Prefix key ``j`` has its logit raised by ``prefix_bias[t, j]``
(``ln c`` for a row that stands for ``c`` identical pruned prompts). Prefix slots at or past
``prefix_len[t]`` are ignored.

The same softmax can be computed in two parts and merged exactly (the cascade of FlashInfer's
``merge_state``): attention over the row's tokens alone with its log-sum-exp ``lse_t``, attention over the
prefix alone with ``lse_p``, then ``out = w_t * out_t + w_p * out_p`` with ``w = exp(lse - logaddexp(lse_t,
lse_p))``. :func:`prefix_attention_cascade_reference` does that in plain PyTorch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def prefix_mask(
    prefix_bias: Tensor, prefix_len: Tensor, task_of_row: Tensor, num_tokens: int, dtype: torch.dtype
) -> Tensor:
    """Additive attention mask ``[B, 1, 1, P_max + N]``: prefix bias, ``-inf`` on padding, 0 on tokens."""
    p_max = prefix_bias.shape[1]
    bias = prefix_bias.index_select(0, task_of_row).to(dtype)
    positions = torch.arange(p_max, device=prefix_bias.device)
    padded = positions[None, :] >= prefix_len.index_select(0, task_of_row)[:, None]
    bias = bias.masked_fill(padded, float("-inf"))
    tokens = torch.zeros(bias.shape[0], num_tokens, dtype=dtype, device=bias.device)
    return torch.cat([bias, tokens], dim=1)[:, None, None, :]


def prefix_attention_reference(
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
    """Explicit concatenation and masked softmax, computed in fp32; returns ``q``'s dtype.

    Shapes: q, k, v ``[B, H, N, d]``; prefix_k, prefix_v ``[tasks, H, P_max, d]``;
    prefix_bias ``[tasks, P_max]``; prefix_len ``[tasks]``; task_of_row ``[B]``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rows = task_of_row.long()
    keys = torch.cat([prefix_k.index_select(0, rows), k], dim=2).float()
    values = torch.cat([prefix_v.index_select(0, rows), v], dim=2).float()
    mask = prefix_mask(prefix_bias.float(), prefix_len.long(), rows, k.shape[2], torch.float32)
    logits = q.float() @ keys.transpose(-1, -2) * scale + mask
    return (logits.softmax(dim=-1) @ values).to(q.dtype)


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
    prefix_len: Tensor,
    task_of_row: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Each row over its task's prefix only: fp32 output and log-sum-exp (see ``token_attention_reference``).

    A row whose prefix is empty or fully masked has ``lse = -inf`` and output 0: it adds nothing to a merge.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rows = task_of_row.long()
    mask = prefix_mask(prefix_bias.float(), prefix_len.long(), rows, 0, torch.float32)
    logits = q.float() @ prefix_k.index_select(0, rows).float().transpose(-1, -2) * scale + mask
    lse = logits.logsumexp(dim=-1)
    weights = (logits - lse.nan_to_num(neginf=0.0)[..., None]).exp()  # all -inf -> exp(-inf) = 0, no NaN
    return weights @ prefix_v.index_select(0, rows).float(), lse


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
    prefix_len: Tensor,
    task_of_row: Tensor,
    scale: float | None = None,
) -> Tensor:
    """The contract computed as tokens and prefix apart, then merged; equal to the reference in fp32."""
    out_t, lse_t = token_attention_reference(q, k, v, scale)
    out_p, lse_p = prefix_part_reference(q, prefix_k, prefix_v, prefix_bias, prefix_len, task_of_row, scale)
    return merge_attention_states(out_t, lse_t, out_p, lse_p).to(q.dtype)

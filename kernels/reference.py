"""Pure-PyTorch reference for attention over a per-row task prefix.

The attention contract every backend implements::

    out = prefix_attention(q, k, v, prefix_k, prefix_v, prefix_bias, prefix_len, task_of_row)

Row ``b`` attends, with one softmax, to the keys ``[prefix_k[t, :, :prefix_len[t]] ; k[b]]``
where ``t = task_of_row[b]``. Prefix key ``j`` has its logit raised by ``prefix_bias[t, j]``
(``ln c`` for a row that stands for ``c`` identical pruned prompts). Prefix slots at or past
``prefix_len[t]`` are ignored.
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

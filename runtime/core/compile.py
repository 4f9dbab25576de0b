"""Compile-at-load: a task package becomes per-layer prefix keys/values for the frozen backbone.

In deep-prompt mode with CLS pooling a visual prompt's output is overwritten before the next
layer, so a prompt acts on the model only through its key ``W_k LN1(p) + b_k`` and value
``W_v LN1(p) + b_v``. Those are computed once here. All pruned tokens are the zero vector, so
they share one key and one value: ``c`` copies act on softmax like one key with logit ``+ ln c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.core.backbone import Backbone
from runtime.core.package import TaskPackage


@dataclass(frozen=True)
class CompiledTask:
    """Prefix rows ``[visual prompts kept ; null row (if any pruned) ; KV prompts]`` per layer.

    ``keys``/``values`` are ``[L, H, P, d]`` in fp32, ``bias [P]`` is the additive logit bias
    (``ln c`` on the null row, 0 elsewhere), the same for every layer.
    """

    keys: Tensor
    values: Tensor
    bias: Tensor

    @property
    def prefix_len(self) -> int:
        return self.keys.shape[2]


@torch.no_grad()
def compile_task(package: TaskPackage, backbone: Backbone) -> CompiledTask:
    """Project every layer's prompts through that layer's LN1 and K/V weights, in fp32."""
    package.check_backbone(backbone)
    prompts = package.prompts.float()
    # A kept token that is zero in every layer (all its segments pruned) is a pruned token too.
    nonzero = prompts.abs().amax(dim=(0, 2)) > 0
    pruned = package.num_pruned + int((~nonzero).sum())
    prompts = prompts[:, nonzero]
    if pruned:
        prompts = torch.cat([prompts, prompts.new_zeros(prompts.shape[0], 1, prompts.shape[2])], dim=1)
    heads, head_dim = backbone.spec.num_heads, backbone.spec.head_dim
    kv_value = package.kv_key if package.kv_value is None else package.kv_value
    keys, values = [], []
    for layer, block in enumerate(backbone.blocks):
        key, value = project_keys_values(block, prompts[layer].to(backbone.device), heads, head_dim)
        keys.append(torch.cat([key, package.kv_key[layer].float().to(key.device)], dim=1))
        values.append(torch.cat([value, kv_value[layer].float().to(value.device)], dim=1))
    bias = torch.zeros(keys[0].shape[1], device=backbone.device)
    if pruned:
        bias[prompts.shape[1] - 1] = math.log(pruned)
    return CompiledTask(keys=torch.stack(keys), values=torch.stack(values), bias=bias)


def project_keys_values(
    block: torch.nn.Module, tokens: Tensor, heads: int, head_dim: int
) -> tuple[Tensor, Tensor]:
    """``[n, D]`` tokens to fp32 keys and values ``[H, n, d]`` through a timm block's LN1 and qkv."""
    norm, qkv, k_norm = (block.get_submodule(name) for name in ("norm1", "attn.qkv", "attn.k_norm"))
    if not isinstance(norm, torch.nn.LayerNorm) or not isinstance(qkv, torch.nn.Linear):
        raise TypeError(f"expected a pre-LayerNorm block with a qkv Linear, got {type(norm).__name__}")
    dim = tokens.shape[-1]
    normed = F.layer_norm(tokens, (dim,), norm.weight.float(), norm.bias.float(), norm.eps)
    weight = qkv.weight.float()
    bias = qkv.bias.float() if qkv.bias is not None else torch.zeros(3 * dim, device=tokens.device)
    kv = F.linear(normed, weight[dim:], bias[dim:]).view(-1, 2, heads, head_dim).permute(1, 2, 0, 3)
    key, value = kv[0], kv[1]
    if isinstance(k_norm, torch.nn.LayerNorm):
        key = F.layer_norm(key, (head_dim,), k_norm.weight.float(), k_norm.bias.float(), k_norm.eps)
    elif not isinstance(k_norm, torch.nn.Identity):
        raise TypeError(f"unsupported key norm {type(k_norm).__name__}")
    return key, value

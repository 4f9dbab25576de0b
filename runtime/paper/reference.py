"""The paper's forward, written plainly over its own checkpoint layout. For tests and validation only.

Prompts are inserted after CLS and overwritten before every layer ``i >= 1``; masks are multiplied
in and pruned tokens stay in the sequence as zero vectors; key/value prompts are concatenated
after the K/V projections; attention is an explicit softmax. Nothing here is compiled or fused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.paper import layout as keys

LN_EPS = 1e-6


def _segment_dim_mask(segment_mask: Tensor, dim: int) -> Tensor:
    """The paper's ``[Np, S]`` segment mask tiled along the width: dim ``d`` of a token uses column ``d % S``.

    Written here from the paper's definition, not imported from the runtime it checks.
    """
    return segment_mask[:, torch.arange(dim) % segment_mask.shape[-1]]


def _mask_prompts(state: dict[str, Tensor], prompts: Tensor) -> Tensor:
    if keys.TOKEN_MASK in state:
        prompts = prompts * state[keys.TOKEN_MASK].to(prompts.dtype)[:, None]
    if keys.SEGMENT_MASK in state:
        prompts = prompts * _segment_dim_mask(state[keys.SEGMENT_MASK].to(prompts.dtype), prompts.shape[-1])
    return prompts


def _linear(state: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return F.linear(x, state[name + ".weight"], state[name + ".bias"])


def _layer_norm(state: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), state[name + ".weight"], state[name + ".bias"], LN_EPS)


def _kv_prompts(state: dict[str, Tensor], layer: int) -> tuple[Tensor, Tensor] | None:
    shared = keys.KV_SHARED.format(i=layer)
    if shared in state:
        return state[shared], state[shared]
    key, value = keys.KV_KEY.format(i=layer), keys.KV_VALUE.format(i=layer)
    if key in state:
        return state[key], state[value]
    return None


@torch.no_grad()
def paper_forward(state: dict[str, Tensor], images: Tensor, num_heads: int) -> Tensor:
    """Logits ``[B, C]`` of the E2VPT model stored in ``state`` (paper key names), in fp32."""
    state = {k: v.float() for k, v in state.items()}
    t = keys.PREFIX
    patch_w = state[t + "embeddings.patch_embeddings.weight"]
    patches = F.conv2d(
        images.float(), patch_w, state[t + "embeddings.patch_embeddings.bias"], stride=patch_w.shape[-1]
    )
    patches = patches.flatten(2).transpose(1, 2)
    batch = patches.shape[0]
    cls = state[t + "embeddings.cls_token"].expand(batch, -1, -1)
    x = torch.cat([cls, patches], dim=1) + state[t + "embeddings.position_embeddings"]

    deep = state.get(keys.DEEP_PROMPTS)
    shallow = _mask_prompts(state, state[keys.PROMPTS][0])
    num_prompts = shallow.shape[0]
    x = torch.cat([x[:, :1], shallow.expand(batch, -1, -1), x[:, 1:]], dim=1)
    depth = 1 + max(int(k.split(".")[4]) for k in state if k.startswith(t + "encoder.layer."))
    for i in range(depth):
        if i > 0 and deep is not None and i <= deep.shape[0]:
            prompt = _mask_prompts(state, deep[i - 1]).expand(batch, -1, -1)
            x = torch.cat([x[:, :1], prompt, x[:, 1 + num_prompts :]], dim=1)
        x = x + _attention(
            state,
            keys.LAYER.format(i=i),
            _layer_norm(state, keys.LAYER.format(i=i) + "attention_norm", x),
            num_heads,
            _kv_prompts(state, i),
        )
        hidden = _layer_norm(state, keys.LAYER.format(i=i) + "ffn_norm", x)
        x = x + _linear(
            state,
            keys.LAYER.format(i=i) + "ffn.fc2",
            F.gelu(_linear(state, keys.LAYER.format(i=i) + "ffn.fc1", hidden)),
        )
    x = _layer_norm(state, t + "encoder.encoder_norm", x)
    return F.linear(x[:, 0], state[keys.HEAD_WEIGHT], state[keys.HEAD_BIAS])


def _attention(
    state: dict[str, Tensor], layer: str, x: Tensor, num_heads: int, kv_prompts: tuple[Tensor, Tensor] | None
) -> Tensor:
    batch, tokens, dim = x.shape
    head_dim = dim // num_heads

    def heads(name: str) -> Tensor:
        return _linear(state, layer + name, x).view(batch, tokens, num_heads, head_dim).transpose(1, 2)

    q, k, v = heads("attn.query"), heads("attn.key"), heads("attn.value")
    if kv_prompts is not None:
        k = torch.cat([k, kv_prompts[0].expand(batch, -1, -1, -1)], dim=2)
        v = torch.cat([v, kv_prompts[1].expand(batch, -1, -1, -1)], dim=2)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return _linear(state, layer + "attn.out", out)

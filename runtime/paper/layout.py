"""The paper code's checkpoint layout (``enc.transformer.*``, ``head.last_layer.*``) and timm's.

The backbone maps one-to-one onto timm's VisionTransformer; timm fuses Q, K, V into one
``qkv`` linear whose weight is the row-wise concatenation ``[query; key; value]``.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from runtime.core.prompts import TaskPrompts

PREFIX = "enc.transformer."
LAYER = PREFIX + "encoder.layer.{i}."
PROMPTS = PREFIX + "prompt_embeddings"
DEEP_PROMPTS = PREFIX + "deep_prompt_embeddings"
TOKEN_MASK = PREFIX + "prompt_soft_tokens_mask_cls_token"
SEGMENT_MASK = PREFIX + "prompt_soft_tokens_pieces_mask_cls_token"
KV_SHARED = LAYER + "attn.deep_QKV_embeddings"
KV_KEY = KV_SHARED + "_K"
KV_VALUE = KV_SHARED + "_V"
HEAD_WEIGHT = "head.last_layer.weight"
HEAD_BIAS = "head.last_layer.bias"

# paper name -> timm name, for everything that is not per-layer Q/K/V.
_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "encoder.encoder_norm.weight": "norm.weight",
    "encoder.encoder_norm.bias": "norm.bias",
}
_PER_LAYER = {
    "attention_norm": "norm1",
    "ffn_norm": "norm2",
    "attn.out": "attn.proj",
    "ffn.fc1": "mlp.fc1",
    "ffn.fc2": "mlp.fc2",
}
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def backbone_to_paper(timm_state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """timm ViT state dict -> the paper code's backbone keys (``qkv`` split into query/key/value)."""
    out = {PREFIX + paper: timm_state[timm] for paper, timm in _GLOBAL.items()}
    for i in range(depth):
        layer = LAYER.format(i=i)
        for paper, timm in _PER_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{layer}{paper}.{kind}"] = timm_state[f"blocks.{i}.{timm}.{kind}"]
        for kind in ("weight", "bias"):
            query, key, value = timm_state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{layer}attn.query.{kind}"] = query
            out[f"{layer}attn.key.{kind}"] = key
            out[f"{layer}attn.value.{kind}"] = value
    return {k: v.clone() for k, v in out.items()}


def backbone_from_paper(paper_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The paper code's backbone keys -> a timm ViT state dict (``query/key/value`` fused into ``qkv``).

    Raises ``KeyError`` naming the first missing key; prompt, mask and head keys are ignored.
    """
    out: dict[str, Tensor] = {}
    for paper, timm in _GLOBAL.items():
        out[timm] = _require(paper_state, PREFIX + paper)
    layers: dict[int, dict[str, Tensor]] = {}
    for name, tensor in paper_state.items():
        if not name.startswith(PREFIX):
            continue
        match = _LAYER_KEY.match(name[len(PREFIX) :])
        if match:
            layers.setdefault(int(match.group(1)), {})[f"{match.group(2)}.{match.group(3)}"] = tensor
    if not layers:
        raise KeyError(LAYER.format(i=0) + "attention_norm.weight")
    for i in range(max(layers) + 1):
        layer = layers.get(i, {})
        for paper, timm in _PER_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{timm}.{kind}"] = _require(layer, f"{paper}.{kind}", LAYER.format(i=i))
        for kind in ("weight", "bias"):
            parts = [
                _require(layer, f"attn.{p}.{kind}", LAYER.format(i=i)) for p in ("query", "key", "value")
            ]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def _require(state: dict[str, Tensor], key: str, prefix: str = "") -> Tensor:
    if key not in state:
        raise KeyError(prefix + key)
    return state[key]


def prompts_to_paper(prompts: TaskPrompts) -> dict[str, Tensor]:
    """A task's parameters under the paper code's key names (masks included when present)."""
    out = {
        PROMPTS: prompts.prompts[:1].clone(),
        DEEP_PROMPTS: prompts.prompts[1:].clone(),
        HEAD_WEIGHT: prompts.head_weight.clone(),
        HEAD_BIAS: prompts.head_bias.clone(),
    }
    if prompts.token_mask is not None:
        out[TOKEN_MASK] = prompts.token_mask.clone()
    if prompts.segment_mask is not None:
        out[SEGMENT_MASK] = prompts.segment_mask.clone()
    for i in range(prompts.kv_key.shape[0]):
        if prompts.kv_shared:
            out[KV_SHARED.format(i=i)] = prompts.kv_key[i].clone()
        else:
            out[KV_KEY.format(i=i)] = prompts.kv_key[i].clone()
            out[KV_VALUE.format(i=i)] = prompts.values[i].clone()
    return out


def to_paper_state_dict(timm_state: dict[str, Tensor], prompts: TaskPrompts) -> dict[str, Tensor]:
    """The whole model as the paper's training code saves it under ``{"model": ...}``."""
    return {**backbone_to_paper(timm_state, prompts.prompts.shape[0]), **prompts_to_paper(prompts)}

"""The PyTorch engine: every row runs the frozen timm blocks with its own task's prefix."""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.core.backbone import Backbone
from runtime.core.plan import PrefixPlan
from runtime.core.registry import TaskRegistry
from runtime.engines.attention import BINDERS, LayerAttention, resolve_backend
from runtime.engines.base import InferenceEngine


class Engine(InferenceEngine):
    """PyTorch eager: SDPA over the gathered prefix on CPU, the Triton kernel on CUDA."""

    def __init__(
        self, backbone: Backbone, registry: TaskRegistry | None = None, attention: str = "auto"
    ) -> None:
        self.backbone = backbone
        self.registry = registry if registry is not None else TaskRegistry(backbone)
        self.attention = resolve_backend(attention, backbone.device)

    def features(self, plan: PrefixPlan, images: Tensor) -> Tensor:
        """Final-norm CLS features ``[B, D]`` in the backbone's dtype."""
        model = self.backbone.model
        x = model.patch_embed(images.to(device=self.backbone.device, dtype=self.backbone.dtype))
        x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        attend = BINDERS[self.attention](plan, x.shape[1])
        for layer, block in enumerate(model.blocks):
            x = x + block.ls1(self._attention(block, layer, block.norm1(x), attend))
            x = x + block.ls2(block.mlp(block.norm2(x)))
        x = model.norm(x)
        return model.fc_norm(x[:, 0])

    def _attention(self, block: torch.nn.Module, layer: int, x: Tensor, attend: LayerAttention) -> Tensor:
        attn = block.attn
        batch, tokens, dim = x.shape
        qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = attend(layer, attn.q_norm(q), attn.k_norm(k), v)
        return attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, tokens, dim)))

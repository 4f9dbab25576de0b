"""Mixed-task forward: every row runs the frozen backbone with its own task's prefix and head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.attention import BINDERS, LayerAttention, resolve_backend
from runtime.backbone import Backbone
from runtime.registry import Snapshot, TaskEntry, TaskRegistry


class Engine:
    """Runs batches of images, each row under its own task, on one backbone and registry."""

    def __init__(
        self, backbone: Backbone, registry: TaskRegistry | None = None, attention: str = "auto"
    ) -> None:
        self.backbone = backbone
        self.registry = registry if registry is not None else TaskRegistry(backbone)
        self.attention = resolve_backend(attention, backbone.device)

    @torch.inference_mode()
    def forward(self, images: Tensor, task_ids: Sequence[str]) -> list[Tensor]:
        """Logits (fp32, on CPU) per row, each from its own task's head; ``images [B, 3, S, S]``."""
        with self.registry.acquire() as snapshot:
            return self.forward_snapshot(snapshot, images, task_ids)

    @torch.inference_mode()
    def forward_snapshot(self, snapshot: Snapshot, images: Tensor, task_ids: Sequence[str]) -> list[Tensor]:
        if images.dim() != 4 or images.shape[0] != len(task_ids):
            raise ValueError(f"images {tuple(images.shape)} do not match {len(task_ids)} task ids")
        entries = snapshot.entries(task_ids)
        features = self.features(snapshot, images, entries)
        return apply_heads(features, entries)

    def features(self, snapshot: Snapshot, images: Tensor, entries: Sequence[TaskEntry]) -> Tensor:
        """Final-norm CLS features ``[B, D]`` in the backbone's dtype."""
        model = self.backbone.model
        x = model.patch_embed(images.to(device=self.backbone.device, dtype=self.backbone.dtype))
        x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        attend = BINDERS[self.attention](snapshot, snapshot.slots(entries), x.shape[1])
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


def apply_heads(features: Tensor, entries: Sequence[TaskEntry]) -> list[Tensor]:
    """Each row through its own task's linear head, in fp32.

    One matmul per row, not per task: a GEMM's rounding can depend on how many rows it gets,
    and a row's logits must not depend on which rows share its batch.
    """
    features = features.float()
    return [
        F.linear(features[row], entry.head_weight, entry.head_bias).cpu() for row, entry in enumerate(entries)
    ]

"""A task's tuned E2VPT parameters as training left them, before pruning is compiled away."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_SEGMENTS = 16


def segment_dim_mask(segment_mask: Tensor, dim: int) -> Tensor:
    """Expand a ``[Np, S]`` segment mask to ``[Np, dim]``: dim ``d`` belongs to segment ``d mod S``."""
    segments = segment_mask.shape[-1]
    if dim % segments:
        raise ValueError(f"prompt width {dim} is not divisible by the segment count {segments}")
    return segment_mask.repeat(1, dim // segments)


@dataclass
class TaskPrompts:
    """Visual prompts per layer, key/value prompts per layer, pruning masks and the linear head.

    Shapes (``L`` layers, ``Np`` prompt tokens, ``D`` width, ``H`` heads, ``T`` KV prompts):
    ``prompts [L, Np, D]`` (layer 0 is the shallow set), ``kv_key [L, H, T, D/H]``,
    ``kv_value`` the same or ``None`` when one tensor serves as both, ``head_weight [C, D]``,
    ``head_bias [C]``, ``token_mask [Np]`` (1 kept, 0 pruned), ``segment_mask [Np, S]``.
    """

    prompts: Tensor
    kv_key: Tensor
    head_weight: Tensor
    head_bias: Tensor
    kv_value: Tensor | None = None
    token_mask: Tensor | None = None
    segment_mask: Tensor | None = None

    @property
    def kv_shared(self) -> bool:
        return self.kv_value is None

    @property
    def values(self) -> Tensor:
        return self.kv_key if self.kv_value is None else self.kv_value

    def masked_prompts(self) -> Tensor:
        """Prompts with both masks multiplied in, as the paper's forward uses them."""
        prompts = self.prompts
        if self.token_mask is not None:
            prompts = prompts * self.token_mask.to(prompts.dtype)[None, :, None]
        if self.segment_mask is not None:
            prompts = prompts * segment_dim_mask(self.segment_mask.to(prompts.dtype), prompts.shape[-1])[None]
        return prompts

    def kept_tokens(self) -> Tensor:
        """Indices of tokens the token mask keeps (all of them without a mask)."""
        if self.token_mask is None:
            return torch.arange(self.prompts.shape[1])
        return torch.nonzero(self.token_mask != 0).flatten()

    @classmethod
    def random(
        cls,
        depth: int,
        embed_dim: int,
        num_heads: int,
        num_prompts: int,
        num_kv: int,
        num_classes: int,
        seed: int,
        shared_kv: bool = True,
        pruned_tokens: int = 0,
        pruned_segments: int = 0,
        segments: int = DEFAULT_SEGMENTS,
        scale: float = 1.0,
    ) -> TaskPrompts:
        """Seeded random parameters; pruning picks random tokens and random (token, segment) pairs."""
        gen = torch.Generator().manual_seed(seed)
        head_dim = embed_dim // num_heads

        def draw(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen) * scale

        token_mask = segment_mask = None
        if pruned_tokens:
            token_mask = torch.ones(num_prompts)
            token_mask[torch.randperm(num_prompts, generator=gen)[:pruned_tokens]] = 0
        if pruned_segments:
            segment_mask = torch.ones(num_prompts * segments)
            segment_mask[torch.randperm(num_prompts * segments, generator=gen)[:pruned_segments]] = 0
            segment_mask = segment_mask.view(num_prompts, segments)
        return cls(
            prompts=draw(depth, num_prompts, embed_dim),
            kv_key=draw(depth, num_heads, num_kv, head_dim),
            kv_value=None if shared_kv else draw(depth, num_heads, num_kv, head_dim),
            head_weight=draw(num_classes, embed_dim) * 0.05,
            head_bias=draw(num_classes) * 0.05,
            token_mask=token_mask,
            segment_mask=segment_mask,
        )

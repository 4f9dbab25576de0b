"""The one ViT-with-a-per-row-prefix forward: the torch engine, the ONNX graph and the benchmarks run it.

How, and why this way:

* **timm's own forward, its attention swapped.** timm builds a ViT from an ``attn_layer``; here the
  backbone is built (and fingerprinted) once by :mod:`runtime.core.backbone` for every engine, so
  :func:`install_prefix_attention` swaps each block's ``Attention`` for a :class:`PrefixAttention`
  that *adopts* its submodules: the same parameters under the same state-dict names, so the
  fingerprint, saved files and compile-at-load (which reads ``qkv``/``k_norm``) are unaffected.
  Everything else (patch and position embedding, blocks, norms, pooling) is timm's public
  ``forward_features`` + ``forward_head(pre_logits=True)``: nothing re-implemented, no private API.
* **A task is data.** The per-batch prefix is not a module: like vLLM's LoRA layers, which read the
  batch's adapter mapping from metadata set once per forward, every layer reads the batch's
  backend (a :data:`LayerAttention` bound to its :class:`~runtime.core.plan.PrefixPlan`) from a
  :class:`PrefixBinding` its layers share, set for one forward and cleared after. Installing never
  copies a module, and the backend (torch SDPA, Triton, the exportable form) is the binding's choice.
* **Unbound, it is the plain ViT.** With no binding a :class:`PrefixAttention` computes exactly
  timm's ``Attention`` (gate, q/k norms, output norm included), so one backbone still serves as the
  plain model. The binding is per thread: two threads may run forwards on one backbone at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from runtime.engines.attention import LayerAttention

_INSTALLING = threading.Lock()  # engines built on two threads must not both swap one backbone's layers


class PrefixBinding:
    """The backend the layers of one model attend with during the current forward (per thread)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def attend(self) -> LayerAttention | None:
        return getattr(self._local, "attend", None)

    @contextmanager
    def bound(self, attend: LayerAttention) -> Iterator[None]:
        """Every layer attends with ``attend`` inside the block (nested binds restore the outer one)."""
        outer = self.attend
        self._local.attend = attend
        try:
            yield
        finally:
            self._local.attend = outer

    def __deepcopy__(self, memo: dict[int, Any]) -> PrefixBinding:
        # A copied model gets its own binding (thread-local state cannot be copied, nor should be).
        return PrefixBinding()


class PrefixAttention(nn.Module):
    """Drop-in for timm's ``Attention`` whose keys and values are ``[row's prefix ; tokens]`` when bound.

    Built by :meth:`adopt` from a timm ``Attention``: it holds the very same submodules. Bound, q/k/v
    go to the binding's backend after timm's q/k norms; the output goes through timm's output norm,
    gate and projection. Inference only: a bound backend applies no attention dropout.
    """

    def __init__(self, attn: nn.Module, layer: int, binding: PrefixBinding) -> None:
        super().__init__()
        if type(attn) is not Attention or not isinstance(attn, Attention):
            raise TypeError(
                f"prefix attention replaces timm's Attention, not {type(attn).__name__} (its forward differs)"
            )
        self.layer = layer
        self.binding = binding
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = attn.attn_dim
        self.scale = attn.scale
        self.fused_attn = attn.fused_attn
        self.qkv = attn.qkv
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self.gate = attn.gate
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attend = self.binding.attend
        if attend is None:
            x = self._self_attention(q, k, v, attn_mask, is_causal)
        elif attn_mask is not None or is_causal:
            raise ValueError("a prefix-bound forward takes no attention mask: the prefix plan is the mask")
        else:
            x = attend(self.layer, q, k, v)
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def _self_attention(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """timm ``Attention``'s own core, for the unbound (plain ViT) forward."""
        if self.fused_attn:
            dropout = self.attn_drop.p if self.training else 0.0
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal
            )
        scores = (q * self.scale) @ k.transpose(-2, -1)
        scores = maybe_add_mask(scores, resolve_self_attn_mask(q.shape[2], scores, attn_mask, is_causal))
        return self.attn_drop(scores.softmax(dim=-1)) @ v


def install_prefix_attention(model: VisionTransformer) -> PrefixBinding:
    """Give every block of ``model`` a :class:`PrefixAttention` (once; later calls return the binding)."""
    with _INSTALLING:
        blocks = list(model.blocks)
        installed = prefix_attentions(model)
        if blocks and len(installed) == len(blocks):
            return installed[0].binding
        for layer, block in enumerate(blocks):
            if type(block) is not Block:  # compile-at-load assumes its pre-norm layout too
                name = type(block).__name__
                raise TypeError(f"prefix attention needs timm's Block; block {layer} is {name}")
        binding = PrefixBinding()
        adopted = [
            PrefixAttention(block.get_submodule("attn"), layer, binding) for layer, block in enumerate(blocks)
        ]
        for block, attn in zip(blocks, adopted, strict=True):  # all or nothing
            block.attn = attn
        return binding


def prefix_attentions(model: VisionTransformer) -> list[PrefixAttention]:
    """The model's installed prefix attention modules, in layer order."""
    return [block.attn for block in model.blocks if isinstance(block.attn, PrefixAttention)]


class PrefixViT(nn.Module):
    """A timm ViT whose layers attend per row to a prefix given by the backend of each forward."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model
        self.binding = install_prefix_attention(model)
        self.head_dim = prefix_attentions(model)[0].head_dim

    @property
    def num_tokens(self) -> int:
        """Tokens of a row in every layer: patches plus class (and register) tokens."""
        return self.model.patch_embed.num_patches + self.model.num_prefix_tokens

    def features(self, images: Tensor, attend: LayerAttention) -> Tensor:
        """Pooled, final-norm features ``[B, D]`` of ``images`` with every layer attending via ``attend``."""
        with self.binding.bound(attend):
            return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

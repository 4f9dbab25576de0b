"""The PyTorch engine: timm's forward of the frozen backbone, every layer bound to the batch's prefix plan."""

from __future__ import annotations

from torch import Tensor

from runtime.core.backbone import Backbone
from runtime.core.plan import PrefixPlan
from runtime.core.registry import TaskRegistry
from runtime.engines.attention import BINDERS, resolve_backend
from runtime.engines.base import InferenceEngine
from runtime.engines.prefix_vit import PrefixViT


class Engine(InferenceEngine):
    """PyTorch eager: SDPA over the gathered prefix on CPU, the Triton kernel on CUDA."""

    def __init__(
        self, backbone: Backbone, registry: TaskRegistry | None = None, attention: str = "auto"
    ) -> None:
        self.backbone = backbone
        self.registry = registry if registry is not None else TaskRegistry(backbone)
        self.attention = resolve_backend(attention, backbone.device)
        self.vit = PrefixViT(backbone.model)

    def features(self, plan: PrefixPlan, images: Tensor) -> Tensor:
        """Final-norm CLS features ``[B, D]`` in the backbone's dtype."""
        images = images.to(device=self.backbone.device, dtype=self.backbone.dtype)
        return self.vit.features(images, BINDERS[self.attention](plan, self.vit.num_tokens))

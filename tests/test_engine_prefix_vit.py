"""The one prefix forward: timm's attention swapped in place, its behaviour kept, bound per forward."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention, LayerNorm
from timm.models.vision_transformer import VisionTransformer

from runtime.core.backbone import Backbone, fingerprint
from runtime.core.plan import PrefixPlan
from runtime.core.registry import TaskRegistry
from runtime.engines import Engine, make_engine
from runtime.engines.attention import bind_torch
from runtime.engines.prefix_vit import PrefixAttention, PrefixBinding, PrefixViT, install_prefix_attention
from tests.conftest import TINY
from tests.helpers import images_for, random_package

REPO = Path(__file__).resolve().parents[1]


def test_installing_keeps_weights_names_and_the_plain_forward(tiny_backbone: Backbone) -> None:
    fresh = Backbone.create(TINY, "random", seed=7)
    before = fresh.model.state_dict()
    images = images_for(fresh, 3)
    with torch.inference_mode():
        plain = fresh.model(images)
    binding = install_prefix_attention(fresh.model)
    after = fresh.model.state_dict()
    assert list(after) == list(before)
    assert all(
        after[name] is before[name] or after[name].data_ptr() == before[name].data_ptr() for name in after
    )
    assert fingerprint(after) == fresh.fingerprint == tiny_backbone.fingerprint
    assert install_prefix_attention(fresh.model) is binding  # once per model
    assert all(isinstance(block.attn, PrefixAttention) for block in fresh.model.blocks)
    with torch.inference_mode():
        assert torch.equal(fresh.model(images), plain)  # unbound: exactly the plain ViT


@pytest.mark.parametrize("options", [{}, {"gated": True}, {"qk_norm": True, "scale_norm": True}])
@pytest.mark.parametrize("fused", [True, False])
def test_attention_matches_timm_unbound_and_bound_without_prefix(options: dict, fused: bool) -> None:
    torch.manual_seed(0)
    timm_attention = Attention(32, num_heads=4, qkv_bias=True, norm_layer=LayerNorm, **options).eval()
    timm_attention.fused_attn = fused
    for module in (timm_attention.q_norm, timm_attention.k_norm, timm_attention.norm):
        if isinstance(module, LayerNorm):  # non-trivial norm weights, so a skipped norm shows
            torch.nn.init.normal_(module.weight)
    binding = PrefixBinding()
    ours = PrefixAttention(timm_attention, layer=0, binding=binding)
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        expected = timm_attention(x)
        assert torch.equal(ours(x), expected)
        with binding.bound(lambda layer, q, k, v: F.scaled_dot_product_attention(q, k, v)):
            assert torch.allclose(ours(x), expected, rtol=1e-6, atol=1e-6)


def test_bound_attention_sees_normed_queries_and_keys_and_gates_its_output() -> None:
    torch.manual_seed(1)
    timm_attention = Attention(16, num_heads=2, qk_norm=True, gated=True, norm_layer=LayerNorm).eval()
    binding = PrefixBinding()
    ours = PrefixAttention(timm_attention, layer=3, binding=binding)
    seen = {}

    def record(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seen.update(layer=layer, q=q, k=k)
        return torch.zeros_like(v)

    x = torch.randn(1, 4, 16)
    with torch.inference_mode(), binding.bound(record):
        out = ours(x)
    assert seen["layer"] == 3
    assert torch.allclose(seen["q"].mean(-1), torch.zeros(1, 2, 4), atol=1e-5)  # LayerNorm'd over d
    # Zero attention output: what remains is the projection's bias, gate or not.
    assert torch.allclose(out, timm_attention.proj.bias.expand(1, 4, 16))


def test_binding_is_per_thread_and_cleared_after_a_forward(tiny_backbone: Backbone) -> None:
    vit = PrefixViT(tiny_backbone.model)
    registry = TaskRegistry(tiny_backbone)
    entry = registry.add(random_package(tiny_backbone, "t", seed=1)[0])
    plan = PrefixPlan.build(registry.snapshot, [entry])
    inside, other_thread = threading.Event(), []

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not inside.is_set():
            worker = threading.Thread(target=lambda: other_thread.append(vit.binding.attend))
            worker.start()
            worker.join()
            inside.set()
        return bind_torch(plan, vit.num_tokens)(layer, q, k, v)

    with torch.inference_mode():
        vit.features(images_for(tiny_backbone, 1), attend)
    assert other_thread == [None]  # another thread's forward is the plain ViT meanwhile
    assert vit.binding.attend is None
    with pytest.raises(RuntimeError, match="boom"), vit.binding.bound(attend):
        raise RuntimeError("boom")
    assert vit.binding.attend is None


def test_copied_model_gets_its_own_binding(tiny_backbone: Backbone) -> None:
    vit = PrefixViT(tiny_backbone.model)
    copied = copy.deepcopy(tiny_backbone.model)
    attns = [block.attn for block in copied.blocks]
    assert all(attn.binding is attns[0].binding for attn in attns)
    assert attns[0].binding is not vit.binding


def test_other_attention_and_block_types_are_refused() -> None:
    with pytest.raises(TypeError, match="not Linear"):
        PrefixAttention(torch.nn.Linear(4, 4), 0, PrefixBinding())  # type: ignore[arg-type]
    from timm.models.vision_transformer import ResPostBlock

    model = VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, block_fn=ResPostBlock
    )
    with pytest.raises(TypeError, match="block 0 is ResPostBlock"):
        install_prefix_attention(model)
    assert not any(isinstance(block.attn, PrefixAttention) for block in model.blocks)


def test_one_factory_without_an_import_cycle(tiny_backbone: Backbone) -> None:
    assert isinstance(make_engine("torch", tiny_backbone, attention="torch"), Engine)
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        make_engine("tensorrt", tiny_backbone)
    # The ONNX Runtime engine imports first on its own; the torch side never pulls in onnxruntime.
    for code, expected in [
        ("import runtime.engines.onnxruntime_engine", ""),
        ("import sys, runtime.engines, runtime.cli; print('onnxruntime' in sys.modules)", "False"),
    ]:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected

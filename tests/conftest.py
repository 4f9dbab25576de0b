"""Shared fixtures: small seeded backbones and tasks so the suite fits CI on a 2-core CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton reads TRITON_INTERPRET when it is first imported, and timm imports it: without a GPU,
# the kernel tests run in Triton's CPU interpreter, so select it before anything imports triton.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.core.backbone import Backbone, BackboneSpec

TINY = BackboneSpec(embed_dim=64, depth=2, num_heads=4, img_size=32, patch_size=8, name="test-tiny")
SMALL = BackboneSpec(embed_dim=96, depth=3, num_heads=3, img_size=48, patch_size=16, name="test-small")


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    return Backbone.create(TINY, "random", seed=7)


@pytest.fixture(scope="session")
def small_backbone() -> Backbone:
    return Backbone.create(SMALL, "random", seed=11)

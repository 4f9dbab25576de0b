"""Task package v1: round trip, and every corruption case with its own message."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime import Backbone, PackageError, load_package
from runtime.core.backbone import BackboneError, read_weights
from runtime.core.package import content_checksum
from tests.helpers import random_package


@pytest.fixture
def saved(tiny_backbone: Backbone, tmp_path: Path) -> Path:
    package, _ = random_package(
        tiny_backbone, "task-a", seed=1, pruned_tokens=3, pruned_segments=10, shared_kv=False
    )
    package.labels = [f"label-{i}" for i in range(package.num_classes)]
    return package.save(tmp_path / "task-a.safetensors")


def rewrite(path: Path, tensors: dict | None = None, meta_edit=None, header_edit=None) -> Path:
    """Rewrite a package with edited tensors or metadata (as a careless tool might)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
    data = load_file(str(path))
    if tensors:
        data.update(tensors)
    meta = json.loads(header["task"])
    if meta_edit:
        meta_edit(meta)
    header["task"] = json.dumps(meta)
    if header_edit:
        header_edit(header)
    # A tool that knows the format recomputes the checksum: the checks behind it are what is tested.
    header["checksum"] = content_checksum(header["task"], data)
    save_file(data, str(path), metadata=header)
    return path


def test_round_trip(saved: Path, tiny_backbone: Backbone) -> None:
    package = load_package(saved, tiny_backbone)
    assert package.task_id == "task-a" and package.num_pruned == 3 and not package.kv_shared
    assert package.labels[2] == "label-2"
    again = load_package(package.save(saved.with_name("copy.safetensors")), tiny_backbone)
    assert again.metadata() == package.metadata()
    for name, tensor in package.tensors().items():
        assert torch.equal(again.tensors()[name], tensor)
    meta = package.metadata()
    assert meta["parameters"]["task"] == package.num_parameters
    assert 0 < meta["parameters"]["share_of_backbone"] < 1


CORRUPTIONS = {
    "wrong fingerprint": (
        lambda p: rewrite(p, meta_edit=lambda m: m["backbone"].update(fingerprint="0" * 64)),
        "field 'backbone.fingerprint'",
    ),
    "wrong spec": (lambda p: rewrite(p, meta_edit=lambda m: m["backbone"]["spec"].update(depth=3)), "shape"),
    "wrong prompt width": (
        lambda p: rewrite(p, {"prompts": torch.zeros(2, 7, 65)}),
        "tensor 'prompts': shape",
    ),
    "wrong kv shape": (
        lambda p: rewrite(p, {"kv_value": torch.zeros(2, 4, 5, 8)}),
        "tensor 'kv_value': shape",
    ),
    "integer dtype": (
        lambda p: rewrite(p, {"head.bias": torch.zeros(7, dtype=torch.int32)}),
        "tensor 'head.bias': dtype",
    ),
    "nan": (
        lambda p: rewrite(p, {"head.weight": torch.full((7, 64), float("nan"))}),
        "tensor 'head.weight': contains NaN",
    ),
    "inf": (
        lambda p: rewrite(p, {"kv_key": torch.full((2, 4, 5, 16), float("inf"))}),
        "tensor 'kv_key': contains NaN or Inf",
    ),
    "unknown version": (
        lambda p: rewrite(p, header_edit=lambda h: h.update(format_version="2")),
        "field 'format_version' '2' is not supported",
    ),
    "foreign file": (
        lambda p: rewrite(p, header_edit=lambda h: h.update(format="something")),
        "field 'format'",
    ),
    "missing tensor": (
        lambda p: save_file(
            {"prompts": torch.zeros(1)},
            str(p),
            metadata={
                "format": "e2vpt-task",
                "format_version": "1",
                "task": json.dumps(
                    {
                        "task_id": "x",
                        "num_pruned_tokens": 0,
                        "kv_shared": True,
                        "backbone": {"spec": {}, "fingerprint": ""},
                    }
                ),
            },
        ),
        "tensors missing",
    ),
    "label count": (lambda p: rewrite(p, meta_edit=lambda m: m.update(labels=["a"])), "field 'labels'"),
    "bad task id": (lambda p: rewrite(p, meta_edit=lambda m: m.update(task_id="../etc")), "task id '../etc'"),
    "bad metadata": (
        lambda p: rewrite(p, header_edit=lambda h: h.update(task="{not json")),
        "metadata 'task' is missing or malformed",
    ),
    "truncated": (
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        "truncated or corrupt",
    ),
    "garbage": (lambda p: p.write_bytes(struct.pack("<Q", 12) + b"not a header"), "truncated or corrupt"),
    "empty": (lambda p: p.write_bytes(b""), "truncated or corrupt"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_is_named(case: str, saved: Path, tiny_backbone: Backbone) -> None:
    corrupt, message = CORRUPTIONS[case]
    corrupt(saved)
    with pytest.raises(PackageError) as caught:
        load_package(saved, tiny_backbone)
    assert message in str(caught.value)
    assert str(saved) in str(caught.value) or case in {"wrong fingerprint", "wrong spec"}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="no such file"):
        load_package(tmp_path / "absent.safetensors")


def test_failed_save_leaves_nothing(tiny_backbone: Backbone, tmp_path: Path) -> None:
    package, _ = random_package(tiny_backbone, "t", seed=2)
    package.head_bias = torch.full_like(package.head_bias, float("nan"))
    with pytest.raises(PackageError):
        package.save(tmp_path / "t.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_backbone_weights_load_and_fingerprint(tiny_backbone: Backbone, tmp_path: Path) -> None:
    state = tiny_backbone.model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "b.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "b.pth")
    for name in ("b.safetensors", "b.pth"):
        loaded = Backbone.create(tiny_backbone.spec, tmp_path / name)
        assert loaded.fingerprint == tiny_backbone.fingerprint
    other = Backbone.create(tiny_backbone.spec, "random", seed=8)
    assert other.fingerprint != tiny_backbone.fingerprint


def test_backbone_weights_errors(tiny_backbone: Backbone, tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"\x80\x04junk")
    with pytest.raises(BackboneError, match="not a weights-only torch file"):
        read_weights(tmp_path / "junk.pth")
    save_file({"cls_token": torch.zeros(1, 1, 64)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(BackboneError, match="do not fit"):
        Backbone.create(tiny_backbone.spec, tmp_path / "partial.safetensors")
    with pytest.raises(BackboneError, match="no such file"):
        Backbone.create(tiny_backbone.spec, tmp_path / "absent.safetensors")


def test_fingerprint_is_stable_across_processes(tiny_backbone: Backbone) -> None:
    import subprocess
    import sys

    code = (
        "from tests.conftest import TINY; from runtime import Backbone; "
        "print(Backbone.create(TINY, 'random', seed=7).fingerprint)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == tiny_backbone.fingerprint

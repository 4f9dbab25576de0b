"""The exporter: paper-layout and native checkpoints -> task packages equal to the paper's forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY
from safetensors import safe_open

from exporter.backbone import save_backbone
from exporter.checkpoint import ExportError, read_checkpoint, write_native
from exporter.cli import dispatch, main, task_id_from_path
from exporter.validate import relative_error
from runtime.core.backbone import Backbone
from runtime.core.files import TEMP_SUFFIX
from runtime.core.package import load_package
from runtime.core.prompts import TaskPrompts
from runtime.engines.torch_engine import Engine
from runtime.paper import layout as keys
from runtime.paper.layout import backbone_to_paper, to_paper_state_dict
from runtime.paper.reference import paper_forward

ROOT = Path(__file__).resolve().parents[1]
NUM_PROMPTS, NUM_KV, NUM_CLASSES, SEGMENTS = 6, 3, 5, 16


def tiny_prompts(seed: int, shared_kv: bool = True, pruned_tokens: int = 0, pruned_segments: int = 0):
    return TaskPrompts.random(
        depth=TINY.depth,
        embed_dim=TINY.embed_dim,
        num_heads=TINY.num_heads,
        num_prompts=NUM_PROMPTS,
        num_kv=NUM_KV,
        num_classes=NUM_CLASSES,
        seed=seed,
        shared_kv=shared_kv,
        pruned_tokens=pruned_tokens,
        pruned_segments=pruned_segments,
    )


def write_paper(path: Path, backbone: Backbone, prompts: TaskPrompts, drop=(), change=None) -> Path:
    """A checkpoint as the paper's training code saves it: ``torch.save({"model": state_dict})``."""
    state = to_paper_state_dict(backbone.model.state_dict(), prompts)
    for name in drop:
        del state[name]
    state.update(change or {})
    torch.save({"model": state}, path)
    return path


def load_paper_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def runtime_logits(package_path: Path, backbone_path: Path, images: torch.Tensor) -> torch.Tensor:
    """Load a package the way the server does: backbone from its file, package checked against it."""
    spec = load_package(package_path).backbone_spec
    backbone = Backbone.create(spec, backbone_path)
    package = load_package(package_path, backbone)
    engine = Engine(backbone, attention="torch")
    engine.registry.add(package)
    return torch.stack(engine.forward(images, [package.task_id] * images.shape[0]))


def images(count: int = 3, seed: int = 123) -> torch.Tensor:
    return torch.randn(count, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(seed))


def export(argv: list[str], capsys) -> tuple[int, str, str]:
    status = dispatch([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def expected_prompts(prompts: TaskPrompts) -> torch.Tensor:
    """Kept prompts, masks multiplied in, segment ``d mod S`` tiling written out independently."""
    dims = torch.arange(prompts.prompts.shape[-1])
    out = prompts.prompts.clone()
    if prompts.segment_mask is not None:
        out = out * prompts.segment_mask[:, dims % prompts.segment_mask.shape[1]]
    if prompts.token_mask is None:
        return out
    return (out * prompts.token_mask[:, None])[:, prompts.token_mask != 0]


@pytest.fixture(scope="module")
def backbone_file(tiny_backbone, tmp_path_factory) -> Path:
    return save_backbone(tiny_backbone, tmp_path_factory.mktemp("backbone") / "tiny.safetensors")


@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared-kv", "separate-kv"])
@pytest.mark.parametrize("pruned", [(0, 0), (2, 20)], ids=["no-masks", "masks-in-state"])
def test_paper_checkpoint_export_equals_reference(tiny_backbone, tmp_path, capsys, shared_kv, pruned):
    prompts = tiny_prompts(seed=3, shared_kv=shared_kv, pruned_tokens=pruned[0], pruned_segments=pruned[1])
    checkpoint = write_paper(tmp_path / "last_model.pth", tiny_backbone, prompts)
    out = tmp_path / "task.safetensors"
    status, stdout, _ = export([checkpoint, "--task-id", "my-task", "-o", out], capsys)
    assert status == 0
    status, printed, _ = export(["backbone", checkpoint, "-o", tmp_path / "bb.safetensors"], capsys)
    assert status == 0

    package = load_package(out)
    assert package.task_id == "my-task"
    assert package.num_pruned == pruned[0] and package.num_kept == NUM_PROMPTS - pruned[0]
    assert package.kv_shared == shared_kv
    torch.testing.assert_close(package.prompts, expected_prompts(prompts), rtol=0, atol=0)
    assert package.backbone_fingerprint == tiny_backbone.fingerprint
    assert f"fingerprint {package.backbone_fingerprint}" in printed
    params = package.metadata()["parameters"]
    assert params["task"] == package.num_parameters and 0 < params["share_of_backbone"] < 1
    assert package.provenance["validation"]["relative_error"] <= 1e-5
    assert f"prompts kept {NUM_PROMPTS - pruned[0]}/pruned {pruned[0]} per layer" in stdout

    x = images()
    want = paper_forward(load_paper_state(checkpoint), x, TINY.num_heads)
    assert relative_error(runtime_logits(out, tmp_path / "bb.safetensors", x), want) <= 1e-5


def test_json_masks_follow_the_paper_code(tiny_backbone, tmp_path, capsys):
    prompts = tiny_prompts(seed=4, shared_kv=False)
    checkpoint = write_paper(tmp_path / "cifar.pth", tiny_backbone, prompts)
    # The pruning stage's files: {"N": [pruned token ids]} and {"token id": [pruned segment ids]}, 0-based.
    token_file, segment_file = tmp_path / "2_soft_tokens_to_mask.json", tmp_path / "seg.json"
    token_file.write_text(json.dumps({"2": [1, 4]}))
    segment_file.write_text(json.dumps({"0": [3], "5": [0, 15], "2": []}))
    status, stdout, _ = export(
        [checkpoint, "--token-mask", token_file, "--segment-mask", segment_file, "-o", f"{tmp_path}/"], capsys
    )
    assert status == 0, stdout
    package = load_package(tmp_path / "cifar.safetensors")
    assert package.task_id == "cifar" and package.num_pruned == 2

    state = load_paper_state(checkpoint)
    token_mask, segment_mask = torch.ones(NUM_PROMPTS), torch.ones(NUM_PROMPTS, SEGMENTS)
    token_mask[[1, 4]] = 0
    segment_mask[0, 3] = segment_mask[5, 0] = segment_mask[5, 15] = 0
    state[keys.TOKEN_MASK], state[keys.SEGMENT_MASK] = token_mask, segment_mask
    masked = TaskPrompts(**{**vars(prompts), "token_mask": token_mask, "segment_mask": segment_mask})
    torch.testing.assert_close(package.prompts, expected_prompts(masked), rtol=0, atol=0)
    assert package.prompts[:, 0, 3::SEGMENTS].abs().sum() == 0  # segment 3 of token 0, tiled

    save_backbone(tiny_backbone, tmp_path / "bb.safetensors")
    x = images()
    got = runtime_logits(tmp_path / "cifar.safetensors", tmp_path / "bb.safetensors", x)
    assert relative_error(got, paper_forward(state, x, TINY.num_heads)) <= 1e-5
    assert relative_error(got, paper_forward(load_paper_state(checkpoint), x, TINY.num_heads)) > 1e-3


def test_json_mask_must_agree_with_the_checkpoint_mask(tiny_backbone, tmp_path, capsys):
    prompts = tiny_prompts(seed=5, pruned_tokens=2)
    checkpoint = write_paper(tmp_path / "t.pth", tiny_backbone, prompts)
    kept = prompts.kept_tokens().tolist()
    (tmp_path / "m.json").write_text(json.dumps({"1": [kept[0]]}))
    status, _, err = export([checkpoint, "--token-mask", tmp_path / "m.json", "-o", f"{tmp_path}/o/"], capsys)
    assert status == 1 and "disagrees with key 'enc.transformer.prompt_soft_tokens_mask_cls_token'" in err
    assert not (tmp_path / "o" / "t.safetensors").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"2": [0, 6]}, "key '2': token ids [6] do not fit the 6 tokens"),
        ({"2": ["a"]}, "key '2': expected a list of integer token ids"),
        ([0, 1], "a mask file must hold a JSON object"),
    ],
)
def test_bad_token_mask_file(tiny_backbone, tmp_path, content, message):
    checkpoint = write_paper(tmp_path / "t.pth", tiny_backbone, tiny_prompts(seed=6))
    (tmp_path / "m.json").write_text(json.dumps(content))
    with pytest.raises(ExportError, match=r"m\.json: " + message.replace("[", r"\[").replace("]", r"\]")):
        read_checkpoint(checkpoint, token_mask=tmp_path / "m.json")


def test_segment_mask_file_out_of_range(tiny_backbone, tmp_path):
    checkpoint = write_paper(tmp_path / "t.pth", tiny_backbone, tiny_prompts(seed=6))
    (tmp_path / "s.json").write_text(json.dumps({"9": [0]}))
    with pytest.raises(ExportError, match=r"s\.json: key '9': token id does not fit the 6 prompt tokens"):
        read_checkpoint(checkpoint, segment_mask=tmp_path / "s.json")
    (tmp_path / "s.json").write_text(json.dumps({"1": [16]}))
    with pytest.raises(ExportError, match=r"key '1': segment ids \[16\] do not fit the 16 segments"):
        read_checkpoint(checkpoint, segment_mask=tmp_path / "s.json")


def test_checkpoint_without_kv_prompts_needs_the_head_count(tiny_backbone, tmp_path, capsys):
    prompts = tiny_prompts(seed=7, pruned_tokens=1)
    kv_keys = [keys.KV_SHARED.format(i=i) for i in range(TINY.depth)]
    checkpoint = write_paper(tmp_path / "vpt.pth", tiny_backbone, prompts, drop=kv_keys)
    status, _, err = export([checkpoint, "-o", tmp_path / "vpt.safetensors"], capsys)
    assert status == 1 and "pass --num-heads" in err
    status, _, _ = export([checkpoint, "--num-heads", 4, "-o", tmp_path / "vpt.safetensors"], capsys)
    assert status == 0
    package = load_package(tmp_path / "vpt.safetensors")
    assert package.num_kv == 0 and package.backbone_spec.num_heads == 4
    save_backbone(tiny_backbone, tmp_path / "bb.safetensors")
    x = images()
    want = paper_forward(load_paper_state(checkpoint), x, TINY.num_heads)
    assert (
        relative_error(runtime_logits(tmp_path / "vpt.safetensors", tmp_path / "bb.safetensors", x), want)
        <= 1e-5
    )


def test_extracted_backbone_loads_into_timm_and_matches_the_reference(tiny_backbone, tmp_path, capsys):
    prompts = tiny_prompts(seed=8)
    checkpoint = write_paper(tmp_path / "t.pth", tiny_backbone, prompts)
    status, printed, _ = export(["backbone", checkpoint, "-o", tmp_path / "vit.safetensors"], capsys)
    assert status == 0
    model = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=TINY.img_size,
        patch_size=TINY.patch_size,
        embed_dim=TINY.embed_dim,
        depth=TINY.depth,
        num_heads=TINY.num_heads,
    ).eval()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(tmp_path / "vit.safetensors"), strict=True)
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6

    # The paper's forward with no prompts and an identity head is the reference backbone's CLS feature.
    state = load_paper_state(checkpoint)
    state = {k: v for k, v in state.items() if k in backbone_to_paper(tiny_backbone.model.state_dict(), 2)}
    state[keys.PROMPTS] = torch.zeros(1, 0, TINY.embed_dim)
    state[keys.HEAD_WEIGHT], state[keys.HEAD_BIAS] = torch.eye(TINY.embed_dim), torch.zeros(TINY.embed_dim)
    x = images()
    with torch.no_grad():
        assert relative_error(model(x), paper_forward(state, x, TINY.num_heads)) <= 1e-5

    spec = read_checkpoint(checkpoint).spec
    assert Backbone.create(spec, tmp_path / "vit.safetensors").fingerprint in printed


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_native_checkpoint_export(tiny_backbone, backbone_file, tmp_path, capsys, suffix):
    prompts = tiny_prompts(seed=9, shared_kv=suffix == ".pt", pruned_tokens=2, pruned_segments=15)
    labels = [f"label {i}" for i in range(NUM_CLASSES)]
    meta = {"backbone": {"fingerprint": tiny_backbone.fingerprint}, "labels": labels}
    checkpoint = write_native(tmp_path / f"native{suffix}", prompts, meta)
    # The spec comes from the header of the file `exporter backbone` / save_backbone wrote.
    status, _, err = export([checkpoint, "--backbone", backbone_file, "-o", f"{tmp_path}/n/"], capsys)
    assert status == 0, err
    package = load_package(tmp_path / "n" / "native.safetensors")
    assert package.labels == labels and package.num_pruned == 2
    assert package.provenance["checkpoint_format"] == "native"
    x = images()
    want = paper_forward(to_paper_state_dict(tiny_backbone.model.state_dict(), prompts), x, TINY.num_heads)
    got = runtime_logits(tmp_path / "n" / "native.safetensors", backbone_file, x)
    assert relative_error(got, want) <= 1e-5


def test_native_checkpoint_with_random_backbone_and_spec_in_metadata(tmp_path, capsys):
    prompts = tiny_prompts(seed=10)
    checkpoint = write_native(tmp_path / "demo.safetensors", prompts, {"backbone": {"spec": TINY.to_dict()}})
    argv = [checkpoint, "--backbone", "random", "--seed", 7, "-o", tmp_path / "out.safetensors"]
    status, _, err = export(argv, capsys)
    assert status == 0, err
    assert load_package(tmp_path / "out.safetensors").backbone_spec == TINY

    status, _, err = export([checkpoint, "-o", tmp_path / "x.safetensors"], capsys)
    assert status == 1 and "a native checkpoint holds no backbone: pass --backbone FILE" in err
    status, _, err = export(
        [*argv[:-1], tmp_path / "y.safetensors", "--arch", "vit_tiny_patch16_224"], capsys
    )
    assert status == 1 and "backbone specs disagree" in err


def test_native_checkpoint_against_another_backbone(tiny_backbone, backbone_file, tmp_path, capsys):
    meta = {"backbone": {"fingerprint": "0" * 64}}
    checkpoint = write_native(tmp_path / "n.safetensors", tiny_prompts(seed=11), meta)
    status, _, err = export(
        [checkpoint, "--backbone", backbone_file, "-o", tmp_path / "o.safetensors"], capsys
    )
    assert status == 1
    assert f"metadata 'backbone.fingerprint' {'0' * 64} does not match" in err
    assert tiny_backbone.fingerprint in err and not (tmp_path / "o.safetensors").exists()


def test_paper_checkpoint_against_another_backbone(tiny_backbone, tmp_path, capsys):
    checkpoint = write_paper(tmp_path / "t.pth", tiny_backbone, tiny_prompts(seed=12))
    other = save_backbone(Backbone.create(TINY, "random", seed=99), tmp_path / "other.safetensors")
    status, _, err = export([checkpoint, "--backbone", other, "-o", tmp_path / "o.safetensors"], capsys)
    assert status == 1
    assert f"backbone {other} (fingerprint {Backbone.create(TINY, 'random', seed=99).fingerprint})" in err
    assert f"does not match the backbone of {checkpoint} (fingerprint {tiny_backbone.fingerprint})" in err
    assert not (tmp_path / "o.safetensors").exists()


class RunsCode:
    """Unpickling this would create ``marker``: a weights-only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_not_a_checkpoint(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    status, _, err = export([junk, "-o", tmp_path / "o.safetensors"], capsys)
    assert status == 1 and f"error: {junk}: not a checkpoint" in err

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": RunsCode(marker)}, evil)
    with pytest.raises(ExportError, match=r"evil\.pth: not a checkpoint .*pickled code is never executed"):
        read_checkpoint(evil)
    assert not marker.exists()
    assert not (tmp_path / "o.safetensors").exists()


def test_error_messages_name_file_and_key(tiny_backbone, tmp_path):
    prompts = tiny_prompts(seed=13, shared_kv=False)
    finetuned = tmp_path / "finetuned.pth"
    plain = backbone_to_paper(tiny_backbone.model.state_dict(), TINY.depth)
    torch.save(
        {"model": {**plain, keys.HEAD_WEIGHT: prompts.head_weight, keys.HEAD_BIAS: prompts.head_bias}},
        finetuned,
    )
    cases = {
        "no prompts (key 'enc.transformer.prompt_embeddings' is missing)": finetuned,
        "missing head: key 'head.last_layer.weight'": write_paper(
            tmp_path / "a.pth", tiny_backbone, prompts, drop=[keys.HEAD_WEIGHT]
        ),
        "key 'enc.transformer.deep_prompt_embeddings': shape [1, 5, 64] does not fit [1, 6, 64]": write_paper(
            tmp_path / "b.pth", tiny_backbone, prompts, change={keys.DEEP_PROMPTS: torch.zeros(1, 5, 64)}
        ),
        "key 'head.last_layer.weight': shape [5, 32] does not fit [*, 64]": write_paper(
            tmp_path / "c.pth", tiny_backbone, prompts, change={keys.HEAD_WEIGHT: torch.zeros(5, 32)}
        ),
        "key 'enc.transformer.encoder.layer.1.attn.deep_QKV_embeddings_V' is missing": write_paper(
            tmp_path / "d.pth", tiny_backbone, prompts, drop=[keys.KV_VALUE.format(i=1)]
        ),
        "key 'enc.transformer.encoder.layer.1.attn.deep_QKV_embeddings_K': shape [4, 2, 16]": write_paper(
            tmp_path / "e.pth",
            tiny_backbone,
            prompts,
            change={keys.KV_KEY.format(i=1): torch.zeros(4, 2, 16)},
        ),
        "token mask shape (7,) does not fit the 6 prompt tokens": write_paper(
            tmp_path / "f.pth", tiny_backbone, prompts, change={keys.TOKEN_MASK: torch.ones(7)}
        ),
        "segment mask shape (5, 16) does not fit the 6 prompt tokens": write_paper(
            tmp_path / "g.pth", tiny_backbone, prompts, change={keys.SEGMENT_MASK: torch.ones(5, 16)}
        ),
        "12 segments do not divide width 64": write_paper(
            tmp_path / "h.pth", tiny_backbone, prompts, change={keys.SEGMENT_MASK: torch.ones(6, 12)}
        ),
    }
    for message, path in cases.items():
        with pytest.raises(ExportError) as raised:
            read_checkpoint(path)
        assert str(path) in str(raised.value) and message in str(raised.value), str(raised.value)


def test_validation_refuses_above_tolerance(tiny_backbone, tmp_path, capsys):
    checkpoint = write_paper(tmp_path / "t.pth", tiny_backbone, tiny_prompts(seed=14, pruned_tokens=2))
    out = tmp_path / "t.safetensors"
    status, _, err = export([checkpoint, "--tolerance", 1e-12, "-o", out], capsys)
    assert status == 1 and "validation failed" in err and "(tolerance 1.0e-12); nothing written" in err
    measured = float(err.split("relative error ")[1].split()[0])
    assert 1e-12 < measured <= 1e-5
    assert not out.exists() and not list(tmp_path.glob(".t.safetensors*"))


def test_labels_file(tiny_backbone, tmp_path, capsys):
    checkpoint = write_paper(tmp_path / "t.pth", tiny_backbone, tiny_prompts(seed=15))
    (tmp_path / "labels.txt").write_text("".join(f"cls{i}\n" for i in range(NUM_CLASSES)))
    status, _, _ = export([checkpoint, "--labels", tmp_path / "labels.txt", "-o", f"{tmp_path}/a/"], capsys)
    assert (
        status == 0 and load_package(tmp_path / "a" / "t.safetensors").labels[-1] == f"cls{NUM_CLASSES - 1}"
    )
    (tmp_path / "labels.txt").write_text("one\ntwo\n")
    status, _, err = export([checkpoint, "--labels", tmp_path / "labels.txt", "-o", f"{tmp_path}/b/"], capsys)
    assert status == 1 and "labels.txt: 2 labels for the 5 classes" in err


def test_task_id_from_file_name():
    assert task_id_from_path(Path("runs/my task#1.pth")) == "my-task-1"
    assert task_id_from_path(Path("_cifar.v2.safetensors")) == "cifar.v2"
    with pytest.raises(ExportError, match="pass --task-id"):
        task_id_from_path(Path("###.pth"))


def test_usage_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as raised:
        main([str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "--task-id", "x"])
    assert raised.value.code == 2


def test_command_line(tiny_backbone, tmp_path):
    """Real files and processes: two checkpoints, one bad: exit 1, the good one written, the bad one not."""
    good = write_paper(tmp_path / "good.pth", tiny_backbone, tiny_prompts(seed=16, pruned_tokens=1))
    bad = write_paper(tmp_path / "bad.pth", tiny_backbone, tiny_prompts(seed=17), drop=[keys.HEAD_BIAS])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "exporter", good, bad, "-o", tmp_path / "out"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stdout.startswith("good: prompts kept 5/pruned 1 per layer, KV prompts 3 (shared), classes 5")
    assert f"error: {bad}: missing head: key 'head.last_layer.bias'" in run.stderr
    assert (tmp_path / "out" / "good.safetensors").is_file()
    assert not (tmp_path / "out" / "bad.safetensors").exists()

    helped = subprocess.run(
        [sys.executable, "-m", "exporter", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert helped.returncode == 0
    for text in (
        "exporter backbone CHECKPOINT",
        "exporter onnx",
        "--token-mask",
        "--tolerance",
        "--backbone",
    ):
        assert text in helped.stdout


def test_export_removes_stale_temporaries_and_records_a_checksum(tiny_backbone, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".old.safetensors.0123abcd{TEMP_SUFFIX}"  # left by an exporter killed an hour ago
    fresh = out / f".other.safetensors.89abcdef{TEMP_SUFFIX}"  # another exporter writing right now
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    checkpoint = write_paper(tmp_path / "ckpt.pth", tiny_backbone, tiny_prompts(seed=21))
    status, _, err = export([checkpoint, "-o", f"{out}/"], capsys)
    assert status == 0 and f"removed a stale temporary file of an interrupted export: {stale}" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(["ckpt.safetensors", fresh.name])
    with safe_open(str(out / "ckpt.safetensors"), framework="pt") as handle:
        assert handle.metadata()["checksum"].startswith("sha256:")
    assert load_package(out / "ckpt.safetensors").task_id == "ckpt"  # the checksum verifies

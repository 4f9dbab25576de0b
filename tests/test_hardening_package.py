"""Packages and backbone files under attack: owned tensors, checksums, and only PackageError on bad input."""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import Backbone, PackageError, load_package
from runtime.core.backbone import BackboneError, BackboneSpec
from runtime.core.package import content_checksum
from runtime.core.registry import TaskRegistry
from runtime.engines.torch_engine import Engine
from tests.helpers import images_for, random_package


def overwrite_in_place(path: Path, data: bytes) -> None:
    """As ``cp other path`` does: the same inode, rewritten from the start (no new file, no rename)."""
    with open(path, "r+b") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def truncate(path: Path, size: int = 16) -> None:
    os.truncate(path, size)


def mapped(path: Path) -> bool:
    """Whether this process maps ``path`` (a mapped file that shrinks raises SIGBUS on access)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def raw_safetensors(header: Any, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(encoded)) + encoded + data


def edited(path: Path, edit) -> Path:
    """Rewrite ``path`` with its ``task`` JSON edited and a checksum that matches the edit."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
    tensors = load_file(str(path))
    meta = json.loads(header["task"])
    edit(meta)
    header["task"] = json.dumps(meta)
    header["checksum"] = content_checksum(header["task"], tensors)
    save_file(tensors, str(path), metadata=header)
    return path


@pytest.fixture
def package_path(tiny_backbone: Backbone, tmp_path: Path) -> Path:
    package, _ = random_package(tiny_backbone, "task-a", seed=1, pruned_tokens=2, shared_kv=False)
    return package.save(tmp_path / "task-a.safetensors")


# -- finding 1: loaded tensors belong to the process --------------------------------------------------


def test_package_file_overwritten_or_truncated_after_load_changes_nothing(
    tiny_backbone: Backbone, package_path: Path
) -> None:
    other, _ = random_package(tiny_backbone, "task-a", seed=99, shared_kv=False)
    other_bytes = other.to_bytes()
    package = load_package(package_path, tiny_backbone)
    assert not mapped(package_path), "the package file must be read and closed, not mapped"
    kept = {name: tensor.clone() for name, tensor in package.tensors().items()}
    engine = Engine(tiny_backbone, TaskRegistry(tiny_backbone))
    engine.registry.add(package)
    images = images_for(tiny_backbone, 3, seed=5)
    before = torch.stack(engine.forward(images, ["task-a"] * 3))

    overwrite_in_place(package_path, other_bytes)
    assert package_path.read_bytes().startswith(other_bytes), "the file holds the other package now"
    truncate(package_path)
    for name, tensor in package.tensors().items():
        assert torch.equal(tensor, kept[name]), name
    assert torch.equal(torch.stack(engine.forward(images, ["task-a"] * 3)), before)


def test_backbone_file_overwritten_or_truncated_after_load_changes_nothing(
    tiny_backbone: Backbone, tmp_path: Path
) -> None:
    path = tiny_backbone.save(tmp_path / "backbone.safetensors")
    other = Backbone.create(tiny_backbone.spec, "random", seed=123).save(tmp_path / "other.safetensors")
    backbone = Backbone.create(None, path)
    assert backbone.fingerprint == tiny_backbone.fingerprint
    assert not mapped(path), "the backbone file must be read and closed, not mapped"
    package, _ = random_package(backbone, "task-a", seed=3)
    engine = Engine(backbone, TaskRegistry(backbone))
    engine.registry.add(package)
    images = images_for(backbone, 2, seed=6)
    before = torch.stack(engine.forward(images, ["task-a"] * 2))

    overwrite_in_place(path, other.read_bytes())
    truncate(path)
    assert torch.equal(torch.stack(engine.forward(images, ["task-a"] * 2)), before)
    state = backbone.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tiny_backbone.model.state_dict().items())


# -- content checksum ------------------------------------------------------------------------------


def test_a_bit_flip_in_the_tensors_fails_the_checksum(package_path: Path) -> None:
    data = bytearray(package_path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes: still a well-formed file, other values
    package_path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="checksum mismatch"):
        load_package(package_path)


def test_a_package_without_checksum_loads_with_a_warning(
    tiny_backbone: Backbone, package_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(package_path), framework="pt") as handle:
        header = dict(handle.metadata())
    assert header["checksum"].startswith("sha256:")
    del header["checksum"]
    save_file(load_file(str(package_path)), str(package_path), metadata=header)
    with caplog.at_level(logging.WARNING, logger="e2vpt.package"):
        package = load_package(package_path, tiny_backbone)
    assert package.task_id == "task-a"
    assert "no content checksum" in caplog.text


# -- every malformed file is a PackageError with a message ----------------------------------------


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


TASK_EDITS = {
    "provenance not a mapping": (
        lambda m: m.update(provenance=[1, 2]),
        "field 'provenance' must be an object",
    ),
    "provenance a string": (lambda m: m.update(provenance="x"), "field 'provenance'"),
    "backbone depth a string": (
        lambda m: m["backbone"]["spec"].update(depth="2"),
        "backbone spec field 'depth' must be an integer",
    ),
    "backbone depth a float": (lambda m: m["backbone"]["spec"].update(depth=2.0), "'depth'"),
    "backbone depth a bool": (lambda m: m["backbone"]["spec"].update(depth=True), "'depth'"),
    "backbone depth negative": (lambda m: m["backbone"]["spec"].update(depth=-2), "'depth'"),
    "backbone width huge": (lambda m: m["backbone"]["spec"].update(embed_dim=10**30), "'embed_dim'"),
    "mlp ratio infinite": (lambda m: m["backbone"]["spec"].update(mlp_ratio=float("inf")), "'mlp_ratio'"),
    "spec not an object": (lambda m: m["backbone"].update(spec=[1]), "field 'backbone.spec'"),
    "unknown spec field": (lambda m: m["backbone"]["spec"].update({"x" * 500: 1}), "unknown backbone spec"),
    "backbone not an object": (lambda m: m.update(backbone="vit"), "field 'backbone'"),
    "fingerprint not a string": (lambda m: m["backbone"].update(fingerprint=7), "'backbone.fingerprint'"),
    "pruned count a float": (lambda m: m.update(num_pruned_tokens=1.5), "'num_pruned_tokens'"),
    "pruned count negative": (lambda m: m.update(num_pruned_tokens=-1), "'num_pruned_tokens'"),
    "pruned count huge": (lambda m: m.update(num_pruned_tokens=10**40), "'num_pruned_tokens'"),
    "kv_shared a string": (
        lambda m: m.update(kv_shared="false"),
        "field 'kv_shared' must be a boolean, got a string",
    ),
    "task id a number": (lambda m: m.update(task_id=5), "field 'task_id'"),
    "task id with newline": (lambda m: m.update(task_id="task-a\n"), "is not allowed"),
    "labels not strings": (lambda m: m.update(labels=[1, 2]), "field 'labels'"),
    "preprocess a list": (lambda m: m.update(preprocess=[224]), "field 'preprocess' must be an object"),
    "input size a string": (lambda m: m["preprocess"].update(input_size="224"), "'preprocess.input_size'"),
    "input size huge": (lambda m: m["preprocess"].update(input_size=10**9), "'preprocess.input_size'"),
    "mean NaN": (lambda m: m["preprocess"].update(mean=[float("nan"), 0, 0]), "'preprocess.mean'"),
    "mean a string": (lambda m: m["preprocess"].update(mean="abc"), "'preprocess.mean'"),
    "std zero": (lambda m: m["preprocess"].update(std=[0, 1, 1]), "'preprocess.std'"),
    "crop tiny": (lambda m: m["preprocess"].update(crop_pct=1e-300), "'preprocess.crop_pct'"),
    "resize a list": (lambda m: m["preprocess"].update(resize=["stretch"]), "'preprocess.resize'"),
    "pooling a number": (lambda m: m.update(pooling=3), "field 'pooling'"),
}


@pytest.mark.parametrize("case", sorted(TASK_EDITS))
def test_malformed_task_fields_are_package_errors(case: str, package_path: Path) -> None:
    edit, message = TASK_EDITS[case]
    edited(package_path, edit)
    with pytest.raises(PackageError) as caught:
        load_package(package_path)
    assert message in str(caught.value)
    assert len(str(caught.value)) < 1000


def test_deeply_nested_json_is_a_package_error(package_path: Path, tmp_path: Path) -> None:
    header = {"__metadata__": {"format": "e2vpt-task", "format_version": "1", "task": deep(100_000)}}
    package_path.write_bytes(raw_safetensors(header))
    with pytest.raises(PackageError, match="metadata 'task' is missing or malformed: RecursionError"):
        load_package(package_path)
    package_path.write_bytes(raw_safetensors(deep(100_000).encode()))
    with pytest.raises(PackageError, match="header is not valid JSON"):
        load_package(package_path)


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
FILE_CASES: dict[str, tuple[bytes, str]] = {
    "header a list": (raw_safetensors([1, 2]), "header is a JSON list"),
    "header length huge": (struct.pack("<Q", 2**63) + b"{}", "exceeds"),
    "header past the end": (struct.pack("<Q", 50) + b"{}", "runs past the end"),
    "metadata values not strings": (raw_safetensors({"__metadata__": {"format": 1}}), "'__metadata__'"),
    "metadata a list": (raw_safetensors({"__metadata__": ["x"]}), "'__metadata__'"),
    "tensor entry not an object": (raw_safetensors({"t": 5}), "needs exactly 'dtype'"),
    "unknown dtype": (raw_safetensors({"t": {**F32_2x2, "dtype": "F128"}}, bytes(16)), "dtype 'F128'"),
    "absurd shape": (
        raw_safetensors({"t": {**F32_2x2, "shape": [2**40, 2**40]}}, bytes(16)),
        "shape must be at most",
    ),
    "shape disagrees with bytes": (
        raw_safetensors({"t": {**F32_2x2, "shape": [1000, 1000]}}, bytes(16)),
        "needs 4,000,000 bytes",
    ),
    "empty dim huge": (raw_safetensors({"t": {**F32_2x2, "shape": [0, 2**62]}}, bytes(16)), "shape must be"),
    "too many dims": (raw_safetensors({"t": {**F32_2x2, "shape": [1] * 100}}, bytes(16)), "shape must be"),
    "shape of floats": (raw_safetensors({"t": {**F32_2x2, "shape": [2.0, 2]}}, bytes(16)), "shape must be"),
    "offsets past the end": (
        raw_safetensors({"t": {**F32_2x2, "data_offsets": [0, 10**12]}}, bytes(16)),
        "data_offsets",
    ),
    "overlapping tensors": (
        raw_safetensors({"a": F32_2x2, "b": F32_2x2}, bytes(16)),
        "a gap or overlap",
    ),
    "trailing bytes": (raw_safetensors({"t": F32_2x2}, bytes(20)), "bytes after the last tensor"),
    "not utf-8": (struct.pack("<Q", 2) + b"\xff\xfe", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_malformed_safetensors_layouts_are_package_errors(case: str, tmp_path: Path) -> None:
    data, message = FILE_CASES[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with pytest.raises(PackageError, match="truncated or corrupt") as caught:
        load_package(path)
    assert message in str(caught.value)


def test_special_files_and_size_limit_are_package_errors(tmp_path: Path, monkeypatch) -> None:
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(PackageError, match="not a regular file"):
        load_package(fifo)  # must not hang waiting for a writer
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(PackageError):
        load_package(tmp_path / "dir.safetensors")
    monkeypatch.setattr("runtime.core.package.MAX_PACKAGE_BYTES", 100)
    (tmp_path / "big.safetensors").write_bytes(bytes(101))
    with pytest.raises(PackageError, match="exceeds the limit of 100 bytes"):
        load_package(tmp_path / "big.safetensors")


def test_errors_can_name_the_file_without_its_directory(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(PackageError) as caught:
        load_package(tmp_path / "x.safetensors", name="x.safetensors")
    assert str(tmp_path) not in str(caught.value) and "x.safetensors" in str(caught.value)


def test_backbone_spec_refuses_bad_types(tiny_backbone: Backbone, tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="'depth'"):
        BackboneSpec.from_dict({**tiny_backbone.spec.to_dict(), "depth": "12"})
    (tmp_path / "b.safetensors").write_bytes(raw_safetensors({"t": 1}))
    with pytest.raises(BackboneError, match="not a readable safetensors file"):
        Backbone.create(tiny_backbone.spec, tmp_path / "b.safetensors")


# -- fuzzing: whatever the header and tensor table say, load_package raises PackageError or loads --

JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
TASK_FIELDS = [
    ("task_id",),
    ("num_prompt_tokens",),
    ("num_pruned_tokens",),
    ("kv_shared",),
    ("pooling",),
    ("labels",),
    ("preprocess",),
    ("preprocess", "input_size"),
    ("preprocess", "mean"),
    ("preprocess", "std"),
    ("preprocess", "resize"),
    ("preprocess", "crop_pct"),
    ("preprocess", "interpolation"),
    ("backbone",),
    ("backbone", "spec"),
    ("backbone", "fingerprint"),
    ("backbone", "spec", "embed_dim"),
    ("backbone", "spec", "depth"),
    ("backbone", "spec", "num_heads"),
    ("backbone", "spec", "patch_size"),
    ("backbone", "spec", "img_size"),
    ("backbone", "spec", "mlp_ratio"),
    ("backbone", "spec", "name"),
    ("provenance",),
]
FUZZ_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def assert_only_package_errors(path: Path, backbone: Backbone) -> None:
    try:
        load_package(path, backbone)
    except PackageError as error:
        assert str(error)


@pytest.fixture(scope="module")
def template(tiny_backbone: Backbone) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    package, _ = random_package(tiny_backbone, "fuzz", seed=4, num_prompts=2, num_kv=1, num_classes=2)
    return (
        {"format": "e2vpt-task", "format_version": "1", "task": json.dumps(package.metadata())},
        package.tensors(),
    )


@FUZZ_SETTINGS
@given(edits=st.lists(st.tuples(st.sampled_from(TASK_FIELDS), JSON_VALUES | st.just(...)), max_size=4))
def test_fuzz_task_json_fields(edits, template, tiny_backbone, tmp_path_factory) -> None:
    from safetensors.torch import save

    header, tensors = template
    meta = json.loads(header["task"])
    for path, value in edits:
        target = meta
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if isinstance(target, dict):
            if value is ...:
                target.pop(path[-1], None)
            else:
                target[path[-1]] = value
    task = json.dumps(meta)
    file = tmp_path_factory.mktemp("fuzz") / "fuzz.safetensors"
    file.write_bytes(
        save(tensors, metadata={**header, "task": task, "checksum": content_checksum(task, tensors)})
    )
    assert_only_package_errors(file, tiny_backbone)


TENSOR_ENTRIES = (
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "U8", "F64", "BOOL", "x"]) | JSON_LEAVES,
            "shape": st.lists(st.integers(-2, 70), max_size=5) | JSON_VALUES,
            "data_offsets": st.lists(st.integers(-4, 300), min_size=2, max_size=2) | JSON_VALUES,
        }
    )
    | JSON_VALUES
)


@FUZZ_SETTINGS
@given(
    names=st.lists(
        st.sampled_from(["prompts", "kv_key", "kv_value", "head.weight", "head.bias", "other"]),
        max_size=6,
        unique=True,
    ),
    entries=st.lists(TENSOR_ENTRIES, min_size=6, max_size=6),
    data=st.binary(max_size=300),
    flip=st.integers(0, 400),
)
def test_fuzz_tensor_table(names, entries, data, flip, template, tiny_backbone, tmp_path_factory) -> None:
    header, _ = template
    table: dict[str, Any] = {"__metadata__": header}
    table.update(zip(names, entries, strict=False))
    raw = bytearray(raw_safetensors(table, data))
    raw[flip % len(raw)] ^= 0xFF  # sometimes in the header, sometimes in the data
    file = tmp_path_factory.mktemp("fuzz") / "fuzz.safetensors"
    file.write_bytes(bytes(raw))
    assert_only_package_errors(file, tiny_backbone)


@FUZZ_SETTINGS
@given(
    flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), max_size=3),
    cut=st.integers(0, 2**20),
)
def test_fuzz_bytes_of_a_valid_package(flips, cut, template, tiny_backbone, tmp_path_factory) -> None:
    from safetensors.torch import save

    header, tensors = template
    raw = bytearray(save(tensors, metadata={**header, "checksum": content_checksum(header["task"], tensors)}))
    for position, mask in flips:
        raw[position % len(raw)] ^= mask
    file = tmp_path_factory.mktemp("fuzz") / "fuzz.safetensors"
    file.write_bytes(bytes(raw[: len(raw) - cut % 64 if cut % 3 == 0 else len(raw)]))
    assert_only_package_errors(file, tiny_backbone)

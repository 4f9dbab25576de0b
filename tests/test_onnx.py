"""ONNX export and the ONNX Runtime engine: parity with the PyTorch engine, the CLI, file errors, serving."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from runtime.core.backbone import Backbone
from runtime.core.registry import TaskRegistry
from runtime.engines import make_engine
from runtime.engines.onnx_graph import operator_counts
from runtime.engines.onnxruntime_engine import OnnxEngine, OnnxEngineError, default_providers
from runtime.engines.torch_engine import Engine
from tests.conftest import TINY
from tests.helpers import images_for, random_package, relative_error

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
# (task id, prompt tokens, KV prompts, pruned tokens): prefix lengths 0, 2, 6 (with a null row), 12.
TASKS = [("bare", 0, 0, 0), ("kv-only", 0, 2, 0), ("pruned", 5, 2, 2), ("long", 8, 4, 0)]


def registry_with_tasks(backbone: Backbone) -> TaskRegistry:
    registry = TaskRegistry(backbone, initial_prefix=4)
    for seed, (task_id, prompts, kv, pruned) in enumerate(TASKS):
        package, _ = random_package(
            backbone,
            task_id,
            seed,
            num_prompts=prompts,
            num_kv=kv,
            pruned_tokens=pruned,
            shared_kv=seed % 2 == 0,
        )
        registry.add(package)
    return registry


def assert_same_logits(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for row, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got.shape == want.shape, f"row {row}"
        assert relative_error(got, want) <= TOLERANCE, f"row {row}: {relative_error(got, want):.2e}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """TINY with the tiny_backbone fixture's weights, exported once through the CLI."""
    folder = tmp_path_factory.mktemp("onnx")
    path, optimized = folder / "tiny.onnx", folder / "tiny-optimized.onnx"
    command = [
        sys.executable, "-m", "exporter", "onnx", "--spec", json.dumps(asdict(TINY)), "--weights", "random",
        "--seed", "7", "-o", str(path), "--save-optimized", str(optimized), "--threads", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return path, optimized, result


@pytest.mark.parametrize("backbone_name", ["tiny_backbone", "small_backbone"])
def test_mixed_task_parity_with_torch_engine(backbone_name: str, request: pytest.FixtureRequest) -> None:
    backbone = request.getfixturevalue(backbone_name)
    registry = registry_with_tasks(backbone)
    torch_engine = Engine(backbone, registry)
    onnx_engine = OnnxEngine(backbone, registry, threads=1)
    batches = [
        ["long", "bare", "pruned", "kv-only", "long", "bare"],  # every prefix length in one batch
        ["kv-only", "pruned", "kv-only"],  # longest prefix shorter than the tables
        ["bare", "bare"],  # no prefix at all: P = 0
    ]
    images = images_for(backbone, 6, seed=3)
    for task_ids in batches:
        batch = images[: len(task_ids)]
        assert_same_logits(onnx_engine.forward(batch, task_ids), torch_engine.forward(batch, task_ids))


def test_cli_export_records_fingerprint_and_runs(exported, tiny_backbone: Backbone) -> None:
    path, _, result = exported
    assert result.returncode == 0, result.stderr
    assert tiny_backbone.fingerprint in result.stdout
    model = onnx.load(str(path))
    meta = {prop.key: prop.value for prop in model.metadata_props}
    assert meta["backbone_fingerprint"] == tiny_backbone.fingerprint
    assert json.loads(meta["backbone_spec"]) == asdict(TINY)
    assert [i.name for i in model.graph.input] == ["pixels", "prefix_keys", "prefix_values", "prefix_mask"]

    registry = registry_with_tasks(tiny_backbone)
    task_ids = ["pruned", "long", "bare"]
    images = images_for(tiny_backbone, 3, seed=5)
    engine = make_engine("onnxruntime", tiny_backbone, registry, onnx_path=path, threads=1)
    assert engine.providers == default_providers() == ["CPUExecutionProvider"]
    assert_same_logits(
        engine.forward(images, task_ids), Engine(tiny_backbone, registry).forward(images, task_ids)
    )


def test_onnx_runtime_fuses_gelu_and_attention_scores(exported) -> None:
    _, optimized, result = exported
    assert result.returncode == 0, result.stderr
    counts = operator_counts(onnx.load(str(optimized)))
    assert counts.get("BiasGelu") == TINY.depth  # MatMul bias + erf GELU per MLP
    assert counts.get("FusedMatMul") == TINY.depth  # q scale and K transpose folded into the score MatMul
    assert counts.get("LayerNormalization") == 2 * TINY.depth + 1


def test_offline_transformer_fusions(tmp_path: Path, tiny_backbone: Backbone) -> None:
    from exporter.onnx_export import main

    path = tmp_path / "fused.onnx"
    spec = json.dumps(asdict(TINY))
    assert main(["--spec", spec, "--weights", "random", "--seed", "7", "-o", str(path), "--optimize"]) == 0
    counts = operator_counts(onnx.load(str(path)))
    assert counts.get("SkipLayerNormalization") == 2 * TINY.depth
    registry = registry_with_tasks(tiny_backbone)
    task_ids = ["long", "kv-only"]
    images = images_for(tiny_backbone, 2, seed=8)
    engine = OnnxEngine(tiny_backbone, registry, path, threads=1)
    assert_same_logits(
        engine.forward(images, task_ids), Engine(tiny_backbone, registry).forward(images, task_ids)
    )


def test_cli_usage_and_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exporter.onnx_export import main

    out = str(tmp_path / "x.onnx")
    with pytest.raises(SystemExit) as usage:
        main(["--backbone", "vit_base_patch16_224", "--spec", "{}", "--weights", "random", "-o", out])
    assert usage.value.code == 2
    assert (
        main(["--backbone", "vit_tiny_patch16_224", "--weights", str(tmp_path / "absent.pt"), "-o", out]) == 1
    )
    assert "absent.pt: no such file" in capsys.readouterr().err
    assert main(["--spec", "{not json", "--weights", "random", "-o", out]) == 1
    assert "--spec is not valid JSON" in capsys.readouterr().err
    assert not Path(out).exists()


def test_missing_file_is_named(tmp_path: Path, tiny_backbone: Backbone) -> None:
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(OnnxEngineError, match=f"{missing}: no such file"):
        OnnxEngine(tiny_backbone, onnx_path=missing)


def test_corrupt_and_truncated_files_are_named(tmp_path: Path, exported, tiny_backbone: Backbone) -> None:
    path = exported[0]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for bad in (garbage, truncated):
        with pytest.raises(OnnxEngineError, match=f"{bad}: not a readable ONNX model"):
            OnnxEngine(tiny_backbone, onnx_path=bad)


def test_mismatched_backbone_is_refused(exported) -> None:
    path = exported[0]
    other = Backbone.create(TINY, "random", seed=8)
    with pytest.raises(OnnxEngineError) as error:
        OnnxEngine(other, onnx_path=path)
    message = str(error.value)
    assert str(path) in message and other.fingerprint in message
    recorded = {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}
    assert recorded["backbone_fingerprint"] in message


def test_foreign_onnx_file_is_refused(tmp_path: Path, exported, tiny_backbone: Backbone) -> None:
    model = onnx.load(str(exported[0]))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(model.SerializeToString())
    with pytest.raises(OnnxEngineError, match="not an exported e2vpt-serve backbone"):
        OnnxEngine(tiny_backbone, onnx_path=foreign)


def test_bad_options_and_inputs(exported, tiny_backbone: Backbone) -> None:
    path = exported[0]
    with pytest.raises(OnnxEngineError, match="NoSuchExecutionProvider"):
        OnnxEngine(tiny_backbone, onnx_path=path, providers="NoSuchExecutionProvider")
    with pytest.raises(ValueError, match="threads must be at least 1"):
        OnnxEngine(tiny_backbone, onnx_path=path, threads=0)
    registry = registry_with_tasks(tiny_backbone)
    engine = OnnxEngine(tiny_backbone, registry, path, threads=1)
    with pytest.raises(ValueError, match=r"are not \[1, 3, 32, 32\]"):
        engine.forward(torch.zeros(1, 3, 16, 16), ["long"])


def test_server_answers_identically_on_either_engine(
    tmp_path: Path, exported, tiny_backbone: Backbone
) -> None:
    import tritonclient.grpc.aio as aioclient

    from runtime.serving.server import BackgroundServer, InferenceServer, ServerConfig
    from tests.server_helpers import normalized_images, write_tasks

    packages = write_tasks(tiny_backbone, tmp_path, count=3)
    images = normalized_images(6, TINY.img_size, seed=4)
    task_ids = [packages[i % 3].task_id for i in range(6)]

    def answers(engine) -> list[np.ndarray]:
        config = ServerConfig(
            host="127.0.0.1", port=0, task_dir=tmp_path, model_control_mode="explicit", load_tasks=["*"],
            max_batch_size=8, max_queue_delay_ms=50.0, grace_seconds=5.0,
        )  # fmt: skip
        with BackgroundServer(InferenceServer(engine, config)) as server:

            async def burst() -> list[np.ndarray]:
                async with aioclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client:

                    async def one(row: int) -> np.ndarray:
                        tensor = aioclient.InferInput("input", [1, 3, TINY.img_size, TINY.img_size], "FP32")
                        tensor.set_data_from_numpy(images[row : row + 1])
                        result = await client.infer(task_ids[row], [tensor])
                        return result.as_numpy("logits")[0]

                    return await asyncio.gather(*(one(row) for row in range(len(task_ids))))

            return asyncio.run(burst())

    torch_answers = answers(Engine(tiny_backbone, TaskRegistry(tiny_backbone)))
    onnx_answers = answers(OnnxEngine(tiny_backbone, TaskRegistry(tiny_backbone), exported[0], threads=1))
    for row, (got, want) in enumerate(zip(onnx_answers, torch_answers, strict=True)):
        assert got.shape == want.shape == (packages[row % 3].num_classes,)
        assert relative_error(torch.tensor(got), torch.tensor(want)) <= TOLERANCE, f"row {row}"

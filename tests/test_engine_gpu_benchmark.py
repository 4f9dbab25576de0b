"""The GPU forward benchmark without a GPU: a clear refusal; its variants and report work on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_forward
from benchmarks.common import backbone_spec
from benchmarks.report import publish
from runtime.engines.graphs import EagerReplay


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_refuses_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_forward.main(["--quick", "--output-dir", str(tmp_path)])
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        gpu_forward.run(gpu_forward.GpuForwardConfig(output_dir=None))
    assert not list(tmp_path.iterdir())


def test_variants_run_on_the_cpu() -> None:
    spec = backbone_spec("tiny")
    config = gpu_forward.GpuForwardConfig(
        batch_sizes=(1, 3), task_counts=(3,), attention=("torch",), compile_plain=False
    )
    models = gpu_forward.one_task_models(spec, torch.float32, "cpu", config)
    engines, ids = gpu_forward.mixed_engines(models.backbone, 3, config, EagerReplay)
    assert sorted(engines) == ["ours torch", "ours torch + graphs"]
    graphed = engines["ours torch + graphs"].graphs
    assert graphed is not None and set(graphed.warm_buckets) == {1, 3}  # buckets up to the largest batch
    images = gpu_forward.images_for(spec, 3, torch.float32, "cpu", seed=0)
    outputs = {
        name: variant()
        for name, variant in (
            gpu_forward.one_task_variants(models, images)
            | gpu_forward.mixed_variants(engines, ids, images, 0)
        ).items()
    }
    assert outputs["plain eager"].shape == outputs["paper Np=10 T=5"].shape == (3, 10)
    eager, replayed = outputs["ours torch"], outputs["ours torch + graphs"]
    assert isinstance(eager, list) and isinstance(replayed, list)
    for a, b in zip(eager, replayed, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_report_and_targets_from_results(tmp_path: Path) -> None:
    cells = []
    for batch, eager_ms in ((1, 3.2), (8, 3.3), (256, 25.3)):
        times = {
            "plain eager": eager_ms,
            "plain compiled": eager_ms / 3,
            "ours triton": 0.8 * batch / 8 + 0.5,
        }
        for name, ms in times.items():
            tasks = 8 if name.startswith("ours") else None
            cells += gpu_forward.cells_of({name: ms}, "bf16", batch, tasks)
    targets = gpu_forward.targets(cells)
    assert [(row["batch"], row["status"]) for row in targets] == [(1, "met"), (8, "met"), (256, "MISSED")]
    results = {
        "benchmark": "gpu_forward",
        "config": {},
        "backbone": {"name": "vit_base_patch16_224"},
        "machine": {
            "cpu_model": "test",
            "gpu": "test GPU",
            "usable_cores": 1,
            "torch_threads": 1,
            "torch": "x",
        },
        "cells": cells,
        "targets": targets,
    }
    written = publish(gpu_forward.build_report(results), results, tmp_path)
    markdown = Path(written["md"]).read_text()
    assert "bf16, ours mixed over 8 tasks: ms per batch" in markdown and "x plain compiled" in markdown
    assert json.loads(Path(written["json"]).read_text())["cells"] == cells
    assert Path(written["png"]).stat().st_size > 0

"""Smoke runs of the benchmarks on a tiny ViT, their statistics helpers and the fast paper baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import forward, kernel_prefix_attention, report, serve, task_cache, tasks
from benchmarks.common import (
    RESULTS_DIR,
    config_record,
    interleaved,
    machine,
    paired_ratios,
    percentile,
    summarize,
    target,
)
from benchmarks.report import publish, render_saved
from runtime.core.backbone import Backbone
from runtime.demo import DEMO_SETTINGS, demo_prompts
from runtime.paper.layout import to_paper_state_dict
from runtime.paper.reference import paper_forward
from tests.conftest import TINY


def test_percentile_and_summary_interpolate() -> None:
    samples = [4.0, 1.0, 3.0, 2.0]
    assert percentile(samples, 50) == pytest.approx(2.5)
    assert percentile(samples, 100) == 4.0
    stats = summarize(samples)
    assert (stats["median"], stats["p25"], stats["p75"], stats["n"]) == (2.5, 1.75, 3.25, 4)
    assert paired_ratios([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])["median"] == 2.0
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)


def test_interleaved_runs_every_variant_once_per_round_in_rotating_order() -> None:
    calls: list[str] = []
    variants = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    samples = interleaved(variants, warmup=1, min_reps=3)
    assert {name: len(times) for name, times in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]


@pytest.mark.parametrize("index", range(len(DEMO_SETTINGS)))
def test_sequence_insertion_baseline_equals_the_paper_forward(index: int) -> None:
    backbone = Backbone.create(TINY, "random", seed=3)
    prompts = demo_prompts(TINY, index)
    images = torch.randn(3, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(index))
    expected = paper_forward(
        to_paper_state_dict(backbone.model.state_dict(), prompts), images, TINY.num_heads
    )
    torch.testing.assert_close(
        forward.SequenceInsertion(backbone, prompts)(images), expected, rtol=1e-4, atol=1e-5
    )


def assert_statuses_follow_limits(targets: list[dict]) -> None:
    """Each target says "met" exactly when its value is within its limit (``<= x`` or ``>= x``)."""
    for row in targets:
        comparison, limit = row["limit"].split()
        within = row["value"] <= float(limit) if comparison == "<=" else row["value"] >= float(limit)
        assert comparison in ("<=", ">=") and row["status"] == ("met" if within else "MISSED"), row


def test_target_verdicts() -> None:
    assert target("t", 1.0, 1.03)["status"] == "met"
    assert target("t", 1.1, 1.03) == {"target": "t", "value": 1.1, "limit": "<= 1.03", "status": "MISSED"}
    assert target("t", 2.4, 2.5, smaller_is_better=False)["status"] == "MISSED"
    assert target("t", 0.99, 0.99, smaller_is_better=False, batch=8)["status"] == "met"


def _written(results: dict, name: str) -> dict:
    assert set(results["written"]) == {"json", "md", "png"}
    for path in results["written"].values():
        assert path.endswith(f"{name}.{path.rsplit('.', 1)[1]}")
    with open(results["written"]["json"]) as handle:
        return json.load(handle)


def test_forward_smoke(tmp_path) -> None:
    config = forward.ForwardConfig(
        spec=TINY,
        batch_sizes=(1, 3),
        reps=2,
        max_reps=2,
        budget_seconds=0.0,
        warmup=1,
        agreement_images=4,
        agreement_batch=2,
        output_dir=tmp_path,
    )
    results = forward.run(config)
    saved = _written(results, "forward")
    variants = {cell["variant"] for cell in saved["cells"]}
    assert {
        "plain fp32",
        "plain bf16",
        "ours mixed-8 fp32",
        "ours mixed-8 bf16",
        "onnxruntime mixed-8 fp32",
    } <= variants
    assert {f"paper {forward.setting_name(i)} fp32" for i in forward.PAPER_SETTINGS} <= variants
    assert len(saved["cells"]) == 2 * len(variants)
    assert all(cell["seconds"]["n"] == 2 and cell["seconds"]["median"] > 0 for cell in saved["cells"])
    assert saved["bf16_agreement"]["images"] == 4
    # Per batch size: the mixed batch, three paper settings and bf16 speedup; then bf16 agreement.
    assert len(saved["targets"]) == 2 * (1 + len(forward.PAPER_SETTINGS) + 1) + 1
    assert_statuses_follow_limits(saved["targets"])
    assert "| batch | variant |" in (tmp_path / "forward.md").read_text()


def test_forward_config_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="dtypes"):
        forward.ForwardConfig(dtypes=("fp16",))
    with pytest.raises(ValueError, match="batch sizes"):
        forward.ForwardConfig(batch_sizes=(0,))
    assert forward.parse_args(["--quick", "--batch-sizes", "2"]).batch_sizes == [2]


def test_serve_smoke(tmp_path) -> None:
    config = serve.ServeConfig(
        spec=TINY,
        server="inprocess",
        task_counts=(1, 2),
        concurrency=(1, 3),
        requests_per_cell=6,
        seconds_per_cell=5.0,
        warmup_requests=1,
        overhead_blocks=1,
        overhead_block_size=3,
        output_dir=tmp_path,
    )
    saved = _written(serve.run(config), "serve")
    # 3 batching modes x (1 task uniform + 2 tasks uniform/zipf) x 2 concurrency levels
    assert len(saved["cells"]) == 18
    assert all(cell["errors"] == 0 and cell["completed"] == 6 for cell in saved["cells"])
    assert {cell["mode"] for cell in saved["cells"]} == {"mixed", "per-task", "none"}
    overhead = saved["grpc_overhead"]
    assert overhead["round_trip_ms"]["n"] == 3 and overhead["in_process_forward_ms"]["n"] == 3
    assert overhead["server_side_mean_ms"]["compute_infer"] > 0


def test_serve_config_rejects_a_custom_spec_for_the_subprocess_server() -> None:
    with pytest.raises(ValueError, match="inprocess"):
        serve.ServeConfig(spec=TINY, server="subprocess")
    assert serve.popularity_weights("zipf", 3, 1.0) == [1.0, 0.5, 1 / 3]


def test_tasks_smoke(tmp_path) -> None:
    config = tasks.TasksConfig(
        spec=TINY,
        loaded_counts=(1, 6),
        reps=2,
        max_reps=2,
        budget_seconds=0.0,
        load_reps=3,
        model_copies=1,
        output_dir=tmp_path,
    )
    saved = _written(tasks.run(config), "tasks")
    memory = saved["memory"]
    assert memory["tasks"] == 6
    # Every task stores keys and values per prompt: more bytes than the package's one vector per prompt.
    assert memory["registry_task_bytes_total"] > memory["package_tensor_bytes_total"]
    assert memory["registry_tables_allocated_bytes"] >= memory["registry_task_bytes_total"]
    assert [cell["loaded"] for cell in saved["throughput"]["cells"]] == [1, 6]
    assert all(
        cell["longest_prefix"] == saved["throughput"]["cells"][0]["longest_prefix"]
        for cell in saved["throughput"]["cells"]
    )
    assert all(saved["load_latency"][step]["n"] == 3 for step in ("load_package", "add", "replace"))
    per_task = saved["model_per_task"]
    assert per_task["measured_rss_per_copy_bytes"] > 0
    assert per_task["by_count"][-1]["one_model_per_task_bytes"] == 6 * per_task["backbone_weight_bytes"]
    assert len(saved["targets"]) == 4
    assert_statuses_follow_limits(saved["targets"])


def test_task_cache_smoke(tmp_path) -> None:
    """--quick: 300 tiny tasks, 30 resident, in-process servers."""
    config = task_cache.parse_args(["--quick", "--output-dir", str(tmp_path)])
    saved = _written(task_cache.run(config), "task_cache")
    summary = saved["summary"]
    assert 0 < summary["steady_hit_rate"] < 1
    # At concurrency 1 the replica and the server see the same sequence: the same misses.
    assert summary["steady_misses_server"] == summary["steady_misses_replica"] > 0
    assert saved["probes"]["unexpected_count"] == 0
    assert summary["miss_load_ms"]["n"] > 0 and summary["miss_load_ms"]["median"] > 0
    assert [level["concurrency"] for level in summary["levels"]] == list(config.concurrency)
    for level in summary["levels"]:
        assert level["errors"] == 0 and level["cached_rps"] > 0 and level["resident_rps"] > 0
        assert all(rows >= 1 for rows in level["rows_per_batch"].values())
        classes = level["latency_ms"]
        assert classes["cached, all"]["n"] == classes["resident, all"]["n"] == config.requests_per_level
        assert classes["cached, hits"]["n"] + classes["cached, misses"]["n"] == config.requests_per_level
    memory = summary["memory"]
    assert memory["resident_tasks"] == config.max_resident_tasks
    assert memory["ratio"] >= 1 and 0 < memory["prefix_rows_used_share"] <= 1
    assert len(saved["targets"]) == len(config.concurrency) + 2
    assert_statuses_follow_limits(saved["targets"])
    assert "| source | n | p50 |" in (tmp_path / "task_cache.md").read_text()


def test_task_cache_config_rejects_a_custom_spec_for_the_subprocess_server() -> None:
    with pytest.raises(ValueError, match="inprocess"):
        task_cache.TaskCacheConfig(spec=TINY)
    with pytest.raises(ValueError, match="resident"):
        task_cache.TaskCacheConfig(tasks=10, max_resident_tasks=10)
    settings = task_cache.task_settings(task_cache.TaskCacheConfig(tasks=50, max_resident_tasks=5))
    # Task 0 has the longest prefix (kept tokens, a null row when pruned, KV prompts).
    prefix = [prompts - pruned + (pruned > 0) + kv for prompts, kv, pruned, _, _ in settings]
    assert prefix[0] == max(prefix) and len(set(settings)) > 40


@pytest.mark.parametrize("name", ["forward", "serve", "tasks", "task_cache"])
def test_saved_results_render_again(name: str, tmp_path) -> None:
    """The committed results rebuild their markdown from the JSON alone (the README quotes them)."""
    saved = RESULTS_DIR / f"{name}.json"
    copy = tmp_path / saved.name
    copy.write_bytes(saved.read_bytes())
    written = render_saved(copy)
    assert set(written) == {"md", "png"}
    assert written["md"].read_text() == (RESULTS_DIR / f"{name}.md").read_text()


def test_kernel_sweep_reports_through_the_shared_layer(tmp_path) -> None:
    """The GPU sweep's report, from a made-up cell (its measurement needs CUDA)."""
    config = kernel_prefix_attention.parse_args(["--quick", "--batch", "128", "--output-dir", str(tmp_path)])
    assert (config.batch, config.tasks, config.prefix, config.output_dir) == ([128], (8,), (0, 16), tmp_path)
    cell = {
        "batch": 128, "tasks": 8, "prefix": 16, "kernel_ms": 0.12, "cascade_ms": 0.1, "token_lse_ms": 0.09,
        "token_kernel": "cudnn", "concat_sdpa_ms": 0.3, "sdpa_floor_ms": 0.089, "kernel_over_floor": 1.35,
        "cascade_over_floor": 1.12, "speedup_vs_concat": 2.5, "max_abs_diff_vs_concat": 0.004,
        "cascade_max_abs_diff_vs_concat": 0.003,
    }  # fmt: skip
    results = {
        "benchmark": "kernel_prefix_attention",
        "config": config_record(config),
        "machine": machine(),
        "cells": [{**cell, "batch": 8}, cell],
    }
    written = publish(kernel_prefix_attention.build_report(results), results, config.output_dir)
    assert set(written) == {"json", "md", "png"}
    markdown = Path(written["md"]).read_text()
    assert "| B | tasks | P | kernel ms | cascade ms |" in markdown
    assert "| 128 | 8 | 16 | 0.12 | 0.1 | 0.09 | cudnn |" in markdown
    assert render_saved(Path(written["json"]))["md"].read_text() == markdown


@pytest.mark.parametrize(
    ("module", "option"),
    [(forward, "--quick"), (serve, "--quick"), (tasks, "--quick"), (kernel_prefix_attention, "--quick"),
     (task_cache, "--quick"), (report, "results")],
)  # fmt: skip
def test_cli_help(module, option: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out

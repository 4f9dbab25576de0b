"""The Triton prefix-attention backends against the PyTorch reference, and their fixed launch configurations.

Two backends implement the contract of :mod:`kernels.reference`: the fused kernel
(:mod:`kernels.triton_prefix`) and the cascade (vendor SDPA over the tokens with its log-sum-exp, then
a prefix-and-merge kernel, :mod:`kernels.triton_cascade`). Without CUDA they run in Triton's CPU
interpreter (``TRITON_INTERPRET=1``, set before the kernel modules are imported), so shapes are tiny.
The tests at the end run the compiled kernels at ViT-B shapes in bf16 and need a CUDA device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import kernels.triton_prefix
from kernels import (
    attention_backend,
    launch_configs,
    prefix_attention_cascade_reference,
    prefix_attention_reference,
    token_attention,
    triton_available,
)
from kernels.launch_configs import H100_PREFIX, INTERPRETER, LaunchConfig, derive_table, prefix_config
from kernels.triton_cascade import prefix_attention_cascade
from kernels.triton_prefix import prefix_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
CPU = torch.device("cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
REPO = Path(__file__).resolve().parents[1]
BACKENDS = pytest.mark.parametrize(
    "backend", [prefix_attention, prefix_attention_cascade], ids=["fused", "cascade"]
)
Backend = Callable[..., torch.Tensor]
Inputs = tuple[torch.Tensor, ...]


def make_inputs(
    batch: int,
    heads: int,
    tokens: int,
    head_dim: int,
    prefix_len: list[int],
    task_of_row: list[int],
    p_max: int,
    dtype: torch.dtype,
    device: torch.device = DEVICE,
    seed: int = 0,
) -> Inputs:
    """Strided q/k/v views of a fused ``[B, N, 3, H, d]`` projection, as the runtime passes them."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    qkv = randn(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    tasks = len(prefix_len)
    prefix_k = randn(tasks, heads, p_max, head_dim)
    prefix_v = randn(tasks, heads, p_max, head_dim)
    prefix_bias = torch.rand(tasks, p_max, generator=gen).mul(2.0).to(device)  # e.g. ln c for c <= e^2
    lengths = torch.tensor(prefix_len, dtype=torch.int32, device=device)
    rows = torch.tensor(task_of_row, dtype=torch.int32, device=device)
    return q, k, v, prefix_k, prefix_v, prefix_bias, lengths, rows


def check(backend: Backend, inputs: Inputs, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    out = backend(*inputs, scale=scale)
    expected = prefix_attention_reference(*inputs, scale=scale)
    q = inputs[0]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    return out


def mixed_batch(head_dim: int, dtype: torch.dtype) -> Inputs:
    """Four tasks: a full prefix spanning two 16-key blocks, an empty one, a partial one, and one whose
    every slot is masked by a ``-inf`` bias; N is odd and not a multiple of any block size."""
    inputs = make_inputs(4, 2, 17, head_dim, [20, 0, 7, 3], [2, 0, 3, 1], p_max=20, dtype=dtype)
    inputs[5][3] = float("-inf")
    return inputs


@BACKENDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
def test_matches_reference_mixed_batch(backend: Backend, head_dim: int, dtype: torch.dtype) -> None:
    inputs = mixed_batch(head_dim, dtype)
    assert not inputs[0].is_contiguous()
    check(backend, inputs, dtype)


@BACKENDS
def test_every_prefix_length(backend: Backend) -> None:
    # One task per length 0..P_max, each row on a different task, plus an explicit scale.
    p_max = 5
    inputs = make_inputs(6, 1, 5, 32, list(range(p_max + 1)), [5, 3, 0, 1, 4, 2], p_max, torch.float32)
    check(backend, inputs, torch.float32, scale=0.3)


@BACKENDS
def test_vit_sequence_length(backend: Backend) -> None:
    # N = 197 (ViT-B/16 at 224px): several query and key blocks, the last ones ragged.
    inputs = make_inputs(1, 1, 197, 32, [3, 16], [1], p_max=16, dtype=torch.float32)
    check(backend, inputs, torch.float32)


@BACKENDS
def test_no_prefix_table_is_plain_attention(backend: Backend) -> None:
    inputs = make_inputs(2, 2, 17, 64, [0], [0, 0], p_max=0, dtype=torch.float32)
    out = check(backend, inputs, torch.float32)
    q, k, v = inputs[:3]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@BACKENDS
def test_fully_masked_prefix_gives_plain_attention(backend: Backend) -> None:
    # A -inf bias masks every slot of a valid-length prefix: the first prefix block the online softmax
    # sees is entirely -inf, which must not poison the running maximum. Row 0 sees its tokens only.
    inputs = make_inputs(2, 1, 5, 32, [4, 2], [0, 1], p_max=4, dtype=torch.float32)
    inputs[5][0] = float("-inf")
    out = check(backend, inputs, torch.float32)
    q, k, v = (x[:1] for x in inputs[:3])
    torch.testing.assert_close(out[:1], torch.nn.functional.scaled_dot_product_attention(q, k, v))


@BACKENDS
def test_contiguous_inputs_and_int64_indices(backend: Backend) -> None:
    q, k, v, prefix_k, prefix_v, prefix_bias, lengths, rows = make_inputs(
        2, 2, 5, 32, [3, 1], [1, 1], p_max=3, dtype=torch.float16
    )
    q, k, v = (x.contiguous() for x in (q, k, v))
    check(backend, (q, k, v, prefix_k, prefix_v, prefix_bias, lengths.long(), rows.long()), torch.float16)


@BACKENDS
def test_rejects_unsupported_head_dim(backend: Backend) -> None:
    inputs = make_inputs(1, 1, 5, 48, [1], [0], p_max=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        backend(*inputs)


def test_cascade_reference_equals_reference() -> None:
    inputs = make_inputs(4, 3, 9, 32, [6, 0, 2, 6], [0, 1, 2, 3], p_max=6, dtype=torch.float32, device=CPU)
    inputs[5][3] = float("-inf")
    expected = prefix_attention_reference(*inputs)
    torch.testing.assert_close(prefix_attention_cascade_reference(*inputs), expected, atol=1e-6, rtol=1e-6)
    no_prefix = make_inputs(2, 3, 9, 32, [0], [0, 0], p_max=0, dtype=torch.float32, device=CPU)
    torch.testing.assert_close(
        prefix_attention_cascade_reference(*no_prefix), prefix_attention_reference(*no_prefix)
    )


@pytest.mark.skipif(not INTERPRET, reason="the interpreter check; on CUDA the table configs compile below")
@pytest.mark.parametrize("config", sorted(set(H100_PREFIX.values())), ids=str)
def test_every_table_config_runs(config: LaunchConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    # Block shapes the H100 table can pick (BLOCK_N = 16 included) are valid for tl.dot and the masks.
    monkeypatch.setattr(kernels.triton_prefix, "prefix_config", lambda *args: config)
    inputs = make_inputs(2, 1, 9, 64, [20, 3], [0, 1], p_max=20, dtype=torch.float16)
    check(prefix_attention, inputs, torch.float16)


def test_no_autotuning() -> None:
    # Plain JIT functions: the first call compiles one fixed configuration and times nothing.
    from triton.runtime.autotuner import Autotuner

    import kernels.triton_cascade

    for kernel in (
        kernels.triton_prefix._prefix_attention_kernel,
        kernels.triton_cascade._prefix_merge_kernel,
    ):
        assert not isinstance(kernel, Autotuner)


def test_table_is_derived_from_the_kept_sweep() -> None:
    records = json.loads(launch_configs.SWEEP.read_text())
    assert derive_table(records) == H100_PREFIX
    # The sweep's per-head-dim best single configurations (shared/docs/gpu.md) are the table's mainstay.
    assert H100_PREFIX[64, 128, 16] == LaunchConfig(64, 16, 4, 4)
    assert H100_PREFIX[80, 128, 16] == LaunchConfig(128, 32, 4, 3)


def test_config_selection() -> None:
    bf16, fp32 = torch.bfloat16, torch.float32
    assert prefix_config(None, 64, bf16, 128, 16) == INTERPRETER
    assert prefix_config((9, 0), 64, bf16, 1, 0) == H100_PREFIX[64, 1, 0]
    assert prefix_config((9, 0), 64, bf16, 256, 26) == H100_PREFIX[64, 128, 16]  # nearest case
    assert prefix_config((9, 0), 64, torch.float16, 6, 40) == H100_PREFIX[64, 8, 48]
    assert prefix_config((9, 0), 80, bf16, 64, 0) == H100_PREFIX[80, 128, 16]  # P = 0 not swept for d = 80
    assert prefix_config((9, 0), 64, fp32, 8, 16) == launch_configs.DEFAULT_FP32
    assert prefix_config((8, 0), 64, bf16, 8, 16) == launch_configs.DEFAULT_16BIT
    assert prefix_config((9, 0), 32, bf16, 8, 16) == launch_configs.DEFAULT_16BIT


def test_token_attention_layouts_and_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # The vendor log-sum-exp layouts the cascade accepts, and a kernel whose lse is in base 2 (a wrong
    # layout assumption) is rejected by the first-use check in favour of plain PyTorch.
    lse = torch.randn(2, 3, 5)
    assert torch.equal(token_attention._as_bhn(lse[..., None], 2, 3, 5), lse)
    assert torch.equal(token_attention._as_bhn(torch.cat([lse, lse], dim=2), 2, 3, 5), lse)
    with pytest.raises(ValueError, match="not"):
        token_attention._as_bhn(lse.transpose(1, 2), 2, 3, 5)

    def base2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
        out, lse = token_attention._math(q, k, v, scale)
        return out, lse * 1.4426950408889634

    monkeypatch.setitem(token_attention.KERNELS, "base2", base2)
    monkeypatch.setitem(token_attention.CANDIDATES, "cpu", ("base2",))
    monkeypatch.setattr(token_attention, "_chosen", {})
    q = torch.randn(1, 2, 7, 32)
    assert token_attention.token_backend(q) == "math"
    monkeypatch.setitem(token_attention.CANDIDATES, "cpu", ("base2", "cpu_flash"))
    monkeypatch.setattr(token_attention, "_chosen", {})
    assert token_attention.token_backend(q) == "cpu_flash"


def test_package_api_is_lazy() -> None:
    import kernels

    assert triton_available()
    assert attention_backend("cascade") is kernels.prefix_attention_cascade
    with pytest.raises(ValueError, match="unknown"):
        attention_backend("flex")
    inputs = make_inputs(1, 1, 5, 32, [1], [0], p_max=1, dtype=torch.float32)
    torch.testing.assert_close(kernels.prefix_attention(*inputs), prefix_attention(*inputs))
    torch.testing.assert_close(kernels.prefix_attention_cascade(*inputs), prefix_attention_cascade(*inputs))
    code = (
        "import sys, kernels; assert 'triton' not in sys.modules; assert callable(kernels.attention_backend)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message shown without CUDA")
def test_benchmark_says_it_needs_cuda() -> None:
    from benchmarks.kernel_prefix_attention import main

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["--batch", "128", "--prefix", "16"])


CUDA = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (compiled kernels)")


def vit_batch(batch: int, head_dim: int = 64, heads: int = 12) -> Inputs:
    """ViT-B-like layer in bf16: 8 tasks with prefixes of 0..64 rows, rows spread over them."""
    lengths = [0, 1, 16, 17, 48, 33, 64, 5]
    rows = [(7 * i) % 8 for i in range(batch)]
    return make_inputs(batch, heads, 197, head_dim, lengths, rows, p_max=64, dtype=torch.bfloat16)


@CUDA
@BACKENDS
@pytest.mark.parametrize("batch", [8, 64])
def test_cuda_bf16_vit_shapes(backend: Backend, batch: int) -> None:
    check(backend, vit_batch(batch), torch.bfloat16)


@CUDA
@BACKENDS
def test_cuda_bf16_head_dim_80(backend: Backend) -> None:
    check(backend, vit_batch(16, head_dim=80, heads=16), torch.bfloat16)


@CUDA
def test_cuda_cascade_uses_a_vendor_kernel_and_replays_in_a_graph() -> None:
    # A vendor kernel passed the first-use check (else the lse layout assumption is wrong on this GPU),
    # and the warmed-up cascade captures into a CUDA graph whose replay equals the eager result.
    inputs = vit_batch(8)
    eager = prefix_attention_cascade(*inputs)
    assert token_attention.token_backend(inputs[0]) in ("cudnn", "flash", "efficient")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = prefix_attention_cascade(*inputs)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)

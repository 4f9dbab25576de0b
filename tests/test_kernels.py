"""The Triton prefix-attention backends against the PyTorch reference, and their fixed launch configurations.

Two backends implement the contract of :mod:`kernels.reference`: the fused kernel
(:mod:`kernels.triton_prefix`) and the cascade (vendor SDPA over the tokens with its log-sum-exp, then
a prefix-and-merge kernel, :mod:`kernels.triton_cascade`), both reading each row's prefix from a paged
pool through its slot's table row. The inputs are laid out as awkwardly as the contract allows: pool
rows scattered and out of order, stale table entries past each length, strided views everywhere. The
per-row reference is itself checked against a padded dense computation built here. Without CUDA the
kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before the kernel modules are
imported), so shapes are tiny. The tests at the end run the compiled kernels at ViT-B shapes in bf16
and need a CUDA device.
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
    gather_prefix,
    launch_configs,
    prefix_attention_cascade_reference,
    prefix_attention_reference,
    prefix_mask,
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
KERNELS = pytest.mark.parametrize(
    "backend", [prefix_attention, prefix_attention_cascade], ids=["fused", "cascade"]
)
# The kernels and the cascade reference (tokens and prefix apart, over the padded gather), each against
# the per-row reference.
BACKENDS = pytest.mark.parametrize(
    "backend",
    [prefix_attention, prefix_attention_cascade, prefix_attention_cascade_reference],
    ids=["fused", "cascade", "cascade_reference"],
)
Backend = Callable[..., torch.Tensor]
Inputs = tuple[torch.Tensor, ...]
BIAS, TABLE, LENGTHS, ROWS = 5, 6, 7, 8  # positions of the paged-prefix inputs in an ``Inputs`` tuple


def make_inputs(
    batch: int,
    heads: int,
    tokens: int,
    head_dim: int,
    prefix_len: list[int],
    task_of_row: list[int],
    dtype: torch.dtype,
    width: int | None = None,
    spare: int = 3,
    device: torch.device = DEVICE,
    seed: int = 0,
) -> Inputs:
    """The contract's inputs, laid out as awkwardly as it allows.

    q/k/v are strided views of a fused ``[B, N, 3, H, d]`` projection, as the runtime passes them. The
    pool ``[H, R, d]`` is a transposed view of ``[R, H, d]`` with ``spare`` rows no slot names; each
    slot's rows are scattered over it out of order. The table (width ``width``, default the longest
    prefix) is a column slice of a wider one, and its entries past a slot's length name random pool
    rows, which every backend must ignore.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = randn(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    width = max(prefix_len, default=0) if width is None else width
    pool_rows = sum(prefix_len) + spare
    prefix_k = randn(pool_rows, heads, head_dim).transpose(0, 1)
    prefix_v = randn(pool_rows, heads, head_dim).transpose(0, 1)
    prefix_bias = torch.rand(pool_rows, generator=gen).mul(2.0)  # e.g. ln c for c <= e^2
    wide = torch.randint(0, max(pool_rows, 1), (len(prefix_len), width + 2), generator=gen, dtype=torch.int32)
    table = wide[:, 1 : width + 1]
    scattered = torch.randperm(pool_rows, generator=gen).to(torch.int32)
    start = 0
    for slot, length in enumerate(prefix_len):
        table[slot, :length] = scattered[start : start + length]
        start += length
    lengths = torch.tensor(prefix_len, dtype=torch.int32)
    rows = torch.tensor(task_of_row, dtype=torch.int32)
    return q, k, v, prefix_k, prefix_v, *(x.to(device) for x in (prefix_bias, table, lengths, rows))


def mask_slot(inputs: Inputs, slot: int) -> None:
    """A ``-inf`` bias on every pool row of ``slot``'s prefix: all of it masked, its length unchanged."""
    length = int(inputs[LENGTHS][slot])
    inputs[BIAS][inputs[TABLE][slot, :length].long()] = float("-inf")


def check(backend: Backend, inputs: Inputs, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    out = backend(*inputs, scale=scale)
    expected = prefix_attention_reference(*inputs, scale=scale)
    q = inputs[0]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    return out


def mixed_batch(head_dim: int, dtype: torch.dtype) -> Inputs:
    """Four slots: a full prefix spanning two 16-key blocks, an empty one, a partial one, and one whose
    every row is masked by a ``-inf`` bias; a table wider than every prefix; N is odd and not a multiple
    of any block size."""
    inputs = make_inputs(5, 2, 17, head_dim, [20, 0, 7, 3], [2, 0, 3, 1, 0], dtype, width=22)
    mask_slot(inputs, 3)
    return inputs


@BACKENDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
def test_matches_reference_mixed_batch(backend: Backend, head_dim: int, dtype: torch.dtype) -> None:
    inputs = mixed_batch(head_dim, dtype)
    assert not inputs[0].is_contiguous() and not inputs[3].is_contiguous()
    check(backend, inputs, dtype)


@BACKENDS
def test_every_prefix_length(backend: Backend) -> None:
    # One slot per length 0..5, each row on a different slot, plus an explicit scale.
    inputs = make_inputs(6, 1, 5, 32, list(range(6)), [5, 3, 0, 1, 4, 2], torch.float32)
    check(backend, inputs, torch.float32, scale=0.3)


@BACKENDS
def test_vit_sequence_length(backend: Backend) -> None:
    # N = 197 (ViT-B/16 at 224px): several query and key blocks, the last ones ragged.
    inputs = make_inputs(1, 1, 197, 32, [3, 16], [1], torch.float32)
    check(backend, inputs, torch.float32)


@BACKENDS
def test_no_prefix_is_plain_attention(backend: Backend) -> None:
    # P = 0 and an empty pool (R = 0): the table has no columns.
    inputs = make_inputs(2, 2, 17, 64, [0, 0], [0, 1], torch.float32, spare=0)
    assert inputs[TABLE].shape == (2, 0) and inputs[3].shape == (2, 0, 64)
    out = check(backend, inputs, torch.float32)
    q, k, v = inputs[:3]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@BACKENDS
def test_empty_and_masked_prefixes_give_plain_attention(backend: Backend) -> None:
    # Row 0's slot has length 0 under a table of width 4 whose entries name real rows; row 1's slot
    # has every row masked by a -inf bias (the first prefix block the online softmax sees is entirely
    # -inf, which must not poison the running maximum). Both see their tokens only.
    inputs = make_inputs(3, 1, 5, 32, [0, 4, 2], [0, 1, 2], torch.float32, width=4)
    mask_slot(inputs, 1)
    out = check(backend, inputs, torch.float32)
    q, k, v = (x[:2] for x in inputs[:3])
    torch.testing.assert_close(out[:2], torch.nn.functional.scaled_dot_product_attention(q, k, v))


@BACKENDS
def test_shared_and_repeated_pool_rows(backend: Backend) -> None:
    # Slots need not own disjoint rows: two slots share rows in different orders, one names a row twice,
    # and the pool (R = 3) is smaller than slots * P.
    q, k, v, prefix_k, prefix_v, prefix_bias, *_ = make_inputs(4, 2, 6, 32, [3], [0], torch.float32, spare=0)
    table = torch.tensor([[2, 0, 1, 1], [1, 2, 0, 0], [0, 0, 2, 2]], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([3, 4, 2], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([2, 0, 1, 0], dtype=torch.int32, device=DEVICE)
    check(backend, (q, k, v, prefix_k, prefix_v, prefix_bias, table, lengths, rows), torch.float32)


@BACKENDS
def test_contiguous_inputs_and_int64_indices(backend: Backend) -> None:
    inputs = make_inputs(3, 2, 5, 32, [3, 1], [1, 1, 0], torch.float16)
    q, k, v, prefix_k, prefix_v = (x.contiguous() for x in inputs[:5])
    prefix_bias, table, lengths, rows = inputs[5:]
    check(backend, (q, k, v, prefix_k, prefix_v, prefix_bias, table, lengths, rows.long()), torch.float16)
    long = (q, k, v, prefix_k, prefix_v, prefix_bias, table.long(), lengths.long(), rows.long())
    check(backend, long, torch.float16)


@BACKENDS
def test_strided_bias_and_pool_slices(backend: Backend) -> None:
    # The pool and its bias as strided views into larger interleaved buffers (row stride 2 * d, 3).
    inputs = make_inputs(3, 2, 7, 64, [5, 2, 4], [1, 2, 0], torch.float32, spare=11)
    q, k, v, prefix_k, prefix_v, prefix_bias, table, lengths, rows = inputs
    pool_rows = prefix_k.shape[1]
    wide_k = torch.zeros(2, pool_rows, 2, 64, device=DEVICE)
    wide_v = torch.zeros(2, pool_rows, 2, 64, device=DEVICE)
    wide_bias = torch.zeros(pool_rows, 3, device=DEVICE)
    wide_k[..., 1, :], wide_v[..., 1, :], wide_bias[:, 2] = prefix_k, prefix_v, prefix_bias
    strided = (q, k, v, wide_k[..., 1, :], wide_v[..., 1, :], wide_bias[:, 2], table, lengths, rows)
    out = check(backend, strided, torch.float32)
    torch.testing.assert_close(out, backend(*inputs), atol=1e-6, rtol=1e-6)


@KERNELS
def test_rejects_unsupported_head_dim(backend: Backend) -> None:
    inputs = make_inputs(1, 1, 5, 48, [1], [0], torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        backend(*inputs)


@KERNELS
def test_rejects_inputs_outside_the_contract(backend: Backend) -> None:
    q, k, v, prefix_k, prefix_v, prefix_bias, table, lengths, rows = make_inputs(
        2, 2, 5, 32, [3, 1], [1, 0], torch.float32
    )
    padded = prefix_k[None].expand(2, -1, -1, -1)  # the old per-slot layout [slots, H, P, d]
    cases: list[tuple[tuple[torch.Tensor, ...], str]] = [
        ((padded, padded, prefix_bias, table, lengths, rows), "pool"),
        ((prefix_k, prefix_v[:1], prefix_bias, table, lengths, rows), "pool"),
        ((prefix_k, prefix_v, prefix_bias[None], table, lengths, rows), "prefix_bias"),
        ((prefix_k, prefix_v, prefix_bias, table[0], lengths, rows), "prefix_table must be"),
        ((prefix_k, prefix_v, prefix_bias, table[:1], lengths, rows), "prefix_len"),
        ((prefix_k, prefix_v, prefix_bias, table.float(), lengths, rows), "prefix_table must be int32"),
        ((prefix_k, prefix_v, prefix_bias, table, lengths, rows.short()), "task_of_row must be int32"),
        ((prefix_k, prefix_v, prefix_bias.long(), table, lengths, rows), "floating"),
        ((prefix_k.long(), prefix_v, prefix_bias, table, lengths, rows), "dtype"),
    ]
    for prefix, message in cases:
        with pytest.raises(ValueError, match=message):
            backend(q, k, v, *prefix)


def test_reference_equals_padded_dense_attention() -> None:
    # Independently of kernels.reference: per-slot padded tables filled entry by entry from the pool,
    # one batched softmax with -inf on padding. Also what the runtime's padded helpers must give.
    inputs = make_inputs(5, 3, 7, 32, [5, 0, 2, 4], [3, 0, 2, 1, 3], torch.float32, width=6, device=CPU)
    mask_slot(inputs, 2)
    q, k, v, prefix_k, prefix_v, prefix_bias, table, lengths, rows = inputs
    slots, width = table.shape
    heads, head_dim = q.shape[1], q.shape[3]
    padded_k = torch.zeros(slots, heads, width, head_dim)
    padded_v = torch.zeros(slots, heads, width, head_dim)
    padded_bias = torch.full((slots, width), float("-inf"))
    for slot in range(slots):
        for j in range(int(lengths[slot])):
            row = int(table[slot, j])
            padded_k[slot, :, j], padded_v[slot, :, j] = prefix_k[:, row], prefix_v[:, row]
            padded_bias[slot, j] = prefix_bias[row]
    keys = torch.cat([padded_k[rows.long()], k], dim=2)
    values = torch.cat([padded_v[rows.long()], v], dim=2)
    mask = torch.cat([padded_bias[rows.long()], torch.zeros(len(rows), k.shape[2])], dim=1)[:, None, None]
    expected = (q @ keys.transpose(-1, -2) / head_dim**0.5 + mask).softmax(dim=-1) @ values
    torch.testing.assert_close(prefix_attention_reference(*inputs), expected, atol=1e-6, rtol=1e-6)

    runtime_mask = prefix_mask(prefix_bias, table, lengths, rows.long(), k.shape[2], torch.float32)
    assert torch.equal(runtime_mask, mask)
    gathered_k = torch.cat([gather_prefix(prefix_k, table, rows), k], dim=2)
    gathered_v = torch.cat([gather_prefix(prefix_v, table, rows), v], dim=2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, gathered_k, gathered_v, attn_mask=runtime_mask)
    torch.testing.assert_close(sdpa, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gather_prefix_copies_every_table_entry(index_dtype: torch.dtype) -> None:
    # Positions past a row's length hold whichever pool row the table names there.
    inputs = make_inputs(4, 2, 3, 32, [2, 0, 3], [2, 1, 0, 2], torch.float32, width=5, device=CPU)
    prefix_k, table, rows = inputs[3], inputs[TABLE], inputs[ROWS].to(index_dtype)
    gathered = gather_prefix(prefix_k, table, rows)
    assert gathered.shape == (4, 2, 5, 32)
    for b, slot in enumerate(rows.tolist()):
        for j, row in enumerate(table[slot].tolist()):
            assert torch.equal(gathered[b, :, j], prefix_k[:, row])
    gathered[0].zero_()  # a copy: the pool is untouched
    assert prefix_k.abs().sum() > 0 and not torch.equal(gathered, gather_prefix(prefix_k, table, rows))
    mask = prefix_mask(inputs[BIAS], table, inputs[LENGTHS], rows, 2, torch.float16)
    assert mask.shape == (4, 1, 1, 7) and mask.dtype == torch.float16
    assert mask[1, 0, 0, :5].eq(float("-inf")).all() and mask[:, 0, 0, 5:].eq(0).all()


def test_cascade_reference_equals_reference() -> None:
    inputs = make_inputs(4, 3, 9, 32, [6, 0, 2, 6], [0, 1, 2, 3], torch.float32, device=CPU)
    mask_slot(inputs, 3)
    expected = prefix_attention_reference(*inputs)
    torch.testing.assert_close(prefix_attention_cascade_reference(*inputs), expected, atol=1e-6, rtol=1e-6)
    no_prefix = make_inputs(2, 3, 9, 32, [0], [0, 0], torch.float32, spare=0, device=CPU)
    torch.testing.assert_close(
        prefix_attention_cascade_reference(*no_prefix), prefix_attention_reference(*no_prefix)
    )


@pytest.mark.skipif(not INTERPRET, reason="the interpreter check; on CUDA the table configs compile below")
@pytest.mark.parametrize("config", sorted(set(H100_PREFIX.values())), ids=str)
def test_every_table_config_runs(config: LaunchConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    # Block shapes the H100 table can pick (BLOCK_N = 16 included) are valid for tl.dot and the masks.
    monkeypatch.setattr(kernels.triton_prefix, "prefix_config", lambda *args: config)
    inputs = make_inputs(2, 1, 9, 64, [20, 3], [0, 1], torch.float16)
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
    inputs = make_inputs(1, 1, 5, 32, [1], [0], torch.float32)
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
    """ViT-B-like layer in bf16: 8 tasks with prefixes of 0..64 rows scattered over one pool, rows spread
    over them."""
    lengths = [0, 1, 16, 17, 48, 33, 64, 5]
    rows = [(7 * i) % 8 for i in range(batch)]
    return make_inputs(batch, heads, 197, head_dim, lengths, rows, torch.bfloat16)


@CUDA
@KERNELS
@pytest.mark.parametrize("batch", [8, 64])
def test_cuda_bf16_vit_shapes(backend: Backend, batch: int) -> None:
    check(backend, vit_batch(batch), torch.bfloat16)


@CUDA
@KERNELS
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


@CUDA
@KERNELS
def test_cuda_graph_replay_follows_the_table(backend: Backend) -> None:
    # A captured graph reads the table, the lengths and each row's slot when it replays: new values
    # (tasks moved between slots, other lengths) need no recapture, and nothing in the call synchronizes.
    inputs = vit_batch(8)
    backend(*inputs)  # compiles; the cascade's first-use token-kernel check synchronizes once
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = backend(*inputs)
    table, lengths, rows = inputs[TABLE], inputs[LENGTHS], inputs[ROWS]
    table.copy_(table.flip(0))
    lengths.copy_(lengths.flip(0))
    rows.copy_((rows + 3) % len(lengths))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, backend(*inputs), atol=0, rtol=0)
    check(lambda *args, scale: captured, inputs, torch.bfloat16)

"""The Triton prefix-attention kernel against the PyTorch reference.

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, which must be set
before the kernel module is imported), so shapes are kept tiny. The bf16 test on larger shapes runs
the compiled kernel and needs a CUDA device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernels import prefix_attention_reference, triton_available
from kernels.triton_prefix import prefix_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
REPO = Path(__file__).resolve().parents[1]


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
) -> tuple[torch.Tensor, ...]:
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


def check(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    out = prefix_attention(*inputs)
    expected = prefix_attention_reference(*inputs)
    q = inputs[0]
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    return out


# Three tasks: a full prefix, an empty one (all slots masked) and a partial one; rows mix them.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
def test_matches_reference_mixed_batch(head_dim: int, dtype: torch.dtype) -> None:
    tokens = 17 if head_dim in (32, 80) else 5  # neither is a multiple of any block size
    inputs = make_inputs(3, 2, tokens, head_dim, [20, 0, 7], [2, 0, 1], p_max=20, dtype=dtype)
    assert not inputs[0].is_contiguous()
    check(inputs, dtype)


def test_vit_sequence_length() -> None:
    # N = 197 (ViT-B/16 at 224px): several query and key blocks, the last ones ragged.
    inputs = make_inputs(2, 2, 197, 32, [3, 16], [1, 0], p_max=16, dtype=torch.float32)
    check(inputs, torch.float32)


def test_every_prefix_length() -> None:
    # One task per length 0..P_max, each row on a different task, plus an explicit scale.
    p_max = 5
    lengths = list(range(p_max + 1))
    inputs = make_inputs(6, 1, 5, 32, lengths, [5, 3, 0, 1, 4, 2], p_max=p_max, dtype=torch.float32)
    out = prefix_attention(*inputs, scale=0.3)
    torch.testing.assert_close(out, prefix_attention_reference(*inputs, scale=0.3), atol=1e-5, rtol=1e-5)


def test_no_prefix_table_is_plain_attention() -> None:
    inputs = make_inputs(2, 2, 17, 64, [0], [0, 0], p_max=0, dtype=torch.float32)
    out = check(inputs, torch.float32)
    q, k, v = inputs[:3]
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)


def test_prefix_block_fully_masked_by_bias_gives_no_nan() -> None:
    # A -inf bias masks every slot of a valid-length prefix: the first key block the online softmax
    # sees is entirely -inf, which must not poison the running maximum.
    q, k, v, prefix_k, prefix_v, prefix_bias, lengths, rows = make_inputs(
        2, 1, 5, 32, [4, 2], [0, 1], p_max=4, dtype=torch.float32
    )
    prefix_bias[0] = float("-inf")
    inputs = (q, k, v, prefix_k, prefix_v, prefix_bias, lengths, rows)
    out = check(inputs, torch.float32)
    # Row 0 then only sees its own tokens.
    plain = torch.nn.functional.scaled_dot_product_attention(q[:1], k[:1], v[:1])
    torch.testing.assert_close(out[:1], plain, atol=1e-5, rtol=1e-5)


def test_contiguous_inputs_and_int64_indices() -> None:
    q, k, v, prefix_k, prefix_v, prefix_bias, lengths, rows = make_inputs(
        2, 2, 5, 32, [3, 1], [1, 1], p_max=3, dtype=torch.float16
    )
    q, k, v = (x.contiguous() for x in (q, k, v))
    inputs = (q, k, v, prefix_k, prefix_v, prefix_bias, lengths.long(), rows.long())
    check(inputs, torch.float16)


def test_rejects_unsupported_head_dim() -> None:
    inputs = make_inputs(1, 1, 5, 48, [1], [0], p_max=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        prefix_attention(*inputs)


def test_package_api_is_lazy() -> None:
    import kernels

    assert triton_available()
    inputs = make_inputs(1, 1, 5, 32, [1], [0], p_max=1, dtype=torch.float32)
    torch.testing.assert_close(kernels.prefix_attention(*inputs), prefix_attention(*inputs))
    code = (
        "import sys, kernels; assert 'triton' not in sys.modules; assert callable(kernels.triton_available)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (compiled kernel)")
@pytest.mark.parametrize("head_dim", [64, 80])
def test_cuda_bf16_larger_shapes(head_dim: int) -> None:
    tasks = 8
    lengths = [0, 1, 16, 17, 48, 33, 64, 5]
    rows = [i % tasks for i in range(16)][::-1]
    inputs = make_inputs(16, 12, 197, head_dim, lengths, rows, p_max=64, dtype=torch.bfloat16)
    check(inputs, torch.bfloat16)

"""GPU benchmark: one attention layer of a mixed-task batch, each backend against the no-prefix floor.

Ways to compute the layer (q, k, v are strided views of a fused ``[B, N, 3, H, d]`` qkv projection, as
in the runtime):

* ``kernel``: :func:`kernels.triton_prefix.prefix_attention`, which streams each row's task prefix
  from the shared prefix tables and the row's tokens in one online softmax (fixed launch
  configuration from :mod:`kernels.launch_configs`, no autotuning).
* ``cascade``: :func:`kernels.triton_cascade.prefix_attention_cascade`, the vendor's SDPA over the
  tokens returning its log-sum-exp, then the fused prefix-and-merge kernel.
* ``token_lse``: the cascade's first half alone (the vendor kernel with its log-sum-exp), so that
  ``cascade - token_lse`` is what the merge costs.
* ``concat``: gather every row's prefix (``index_select``), concatenate it with the row's own K/V into
  ``[B, H, P_max + N, d]`` tensors and run ``torch.nn.functional.scaled_dot_product_attention`` with
  the additive mask of :func:`kernels.reference.prefix_mask`. The mask depends only on the batch, so it
  is built once outside the timed region (the runtime would reuse it across layers); the gather and
  concatenation are per layer and are timed.
* ``floor``: cuDNN SDPA over the tokens alone (no prefix at all), the cost floor of this layer.

Target (issue 11, H100, bf16): B = 128, P = 16, d = 64 in <= 0.100 ms; cuDNN's floor there was
measured at 0.089 ms. Expected, from traffic arithmetic only: the cascade costs the floor plus one read
of q and of the token output and one write (~0.03-0.04 ms at B = 128), the fused kernel 1.2-1.6x the
floor (``shared/docs/gpu.md``).

Times are medians of :func:`triton.testing.do_bench` in milliseconds. Writes a markdown table to stdout
and JSON to ``benchmarks/results/kernel_prefix_attention.json``. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from kernels.reference import prefix_mask

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "kernel_prefix_attention.json"
# q, k, v, prefix_k, prefix_v, prefix_bias, prefix_len, task_of_row: the attention contract's inputs.
Case = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernel_prefix_attention",
        description="Prefix attention backends vs cuDNN SDPA with no prefix (CUDA).",
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128], help="batch sizes B")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 64], help="tasks in the tables")
    parser.add_argument("--prefix", type=int, nargs="+", default=[0, 16, 48], help="prefix lengths P")
    parser.add_argument("--heads", type=int, default=12, help="attention heads H")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim d (32, 64, 80 or 128)")
    parser.add_argument("--tokens", type=int, default=197, help="tokens per row N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_case(
    batch: int, tasks: int, prefix: int, heads: int, head_dim: int, tokens: int, dtype: torch.dtype, seed: int
) -> Case:
    """Inputs of one layer: rows spread over all tasks, every task's prefix full (length P)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    prefix_k = torch.randn(tasks, heads, prefix, head_dim, device="cuda", dtype=dtype, generator=gen)
    prefix_v = torch.randn(tasks, heads, prefix, head_dim, device="cuda", dtype=dtype, generator=gen)
    prefix_bias = torch.rand(tasks, prefix, device="cuda", generator=gen)
    prefix_len = torch.full((tasks,), prefix, dtype=torch.int32, device="cuda")
    order = torch.randperm(batch, device="cuda", generator=gen)
    task_of_row = (order % tasks).to(torch.int32)
    return q, k, v, prefix_k, prefix_v, prefix_bias, prefix_len, task_of_row


def batch_mask(case: Case, dtype: torch.dtype) -> torch.Tensor:
    """The ``[B, 1, 1, P_max + N]`` float mask of a batch: built once, shared by all layers."""
    q, _, _, _, _, prefix_bias, prefix_len, task_of_row = case
    return prefix_mask(prefix_bias, prefix_len.long(), task_of_row.long(), q.shape[2], dtype)


def concat_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_bias: torch.Tensor,
    prefix_len: torch.Tensor,
    task_of_row: torch.Tensor,
    *,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The baseline: per-layer gather + concatenation of K/V, then SDPA with the additive mask."""
    del prefix_bias, prefix_len  # already folded into ``mask``
    rows = task_of_row.long()
    keys = torch.cat([prefix_k.index_select(0, rows), k], dim=2)
    values = torch.cat([prefix_v.index_select(0, rows), v], dim=2)
    return sdpa(q, keys, values, attn_mask=mask)


def cudnn_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The floor: cuDNN SDPA (PyTorch's default on an H100) over the row's tokens, no prefix, no mask."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return sdpa(q, k, v)


def run(args: argparse.Namespace) -> list[dict]:
    import triton.testing

    from kernels.token_attention import token_attention, token_backend
    from kernels.triton_cascade import prefix_attention_cascade
    from kernels.triton_prefix import prefix_attention

    dtype = DTYPES[args.dtype]
    results = []
    for batch, tasks, prefix in itertools.product(args.batch, args.tasks, args.prefix):
        case = make_case(batch, tasks, prefix, args.heads, args.head_dim, args.tokens, dtype, args.seed)
        q, k, v = case[:3]
        mask = batch_mask(case, dtype)
        methods: dict[str, Callable[[], object]] = {
            "kernel": functools.partial(prefix_attention, *case),
            "cascade": functools.partial(prefix_attention_cascade, *case),
            "token_lse": functools.partial(token_attention, q, k, v, 1.0 / args.head_dim**0.5),
            "concat": functools.partial(concat_sdpa, *case, mask=mask),
            "floor": functools.partial(cudnn_sdpa, q, k, v),
        }
        # First calls compile the kernels and run the cascade's one-time token-kernel check, untimed.
        expected = concat_sdpa(*case, mask=mask).float()
        errors = {
            name: (backend(*case).float() - expected).abs().max().item()
            for name, backend in (("kernel", prefix_attention), ("cascade", prefix_attention_cascade))
        }
        timings = {
            name: float(triton.testing.do_bench(fn, return_mode="median")) for name, fn in methods.items()
        }
        row = {
            "batch": batch,
            "tasks": tasks,
            "prefix": prefix,
            "kernel_ms": timings["kernel"],
            "cascade_ms": timings["cascade"],
            "token_lse_ms": timings["token_lse"],
            "concat_sdpa_ms": timings["concat"],
            "sdpa_floor_ms": timings["floor"],
            "token_kernel": token_backend(q),
            "speedup_vs_concat": timings["concat"] / timings["kernel"],
            "kernel_over_floor": timings["kernel"] / timings["floor"],
            "cascade_over_floor": timings["cascade"] / timings["floor"],
            "max_abs_diff_vs_concat": errors["kernel"],
            "cascade_max_abs_diff_vs_concat": errors["cascade"],
        }
        results.append(row)
        print(format_row(row), flush=True)
    return results


COLUMNS = (
    "B", "tasks", "P", "kernel ms", "cascade ms", "token+lse ms", "concat+SDPA ms", "cuDNN floor ms",
    "kernel / floor", "cascade / floor", "speedup vs concat", "max abs diff kernel / cascade",
)  # fmt: skip
HEADER = "| " + " | ".join(COLUMNS) + " |\n" + "|" + "---:|" * len(COLUMNS)


def format_row(row: dict) -> str:
    cells = (
        str(row["batch"]),
        str(row["tasks"]),
        str(row["prefix"]),
        f"{row['kernel_ms']:.4f}",
        f"{row['cascade_ms']:.4f}",
        f"{row['token_lse_ms']:.4f} ({row['token_kernel']})",
        f"{row['concat_sdpa_ms']:.4f}",
        f"{row['sdpa_floor_ms']:.4f}",
        f"{row['kernel_over_floor']:.2f}",
        f"{row['cascade_over_floor']:.2f}",
        f"{row['speedup_vs_concat']:.2f}x",
        f"{row['max_abs_diff_vs_concat']:.1e} / {row['cascade_max_abs_diff_vs_concat']:.1e}",
    )
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernel_prefix_attention: needs a CUDA GPU, but torch.cuda.is_available() is False.")
    import triton

    print(
        f"# prefix attention, {torch.cuda.get_device_name()}, H={args.heads} d={args.head_dim} "
        f"N={args.tokens} {args.dtype}; median ms (triton.testing.do_bench)\n"
    )
    print(HEADER, flush=True)
    results = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "kernel_prefix_attention",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "config": {
            "heads": args.heads,
            "head_dim": args.head_dim,
            "tokens": args.tokens,
            "dtype": args.dtype,
        },
        "results": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()

"""Fixed launch configurations for the Triton kernels, chosen offline: nothing is tuned on the request path.

The prefix kernel's configurations on compute capability 9.0 (H100) come from a sweep kept next to this
module, ``configs/h100-prefix-kernel-sweep.json``: the kernel launched with 60 fixed configurations
``[BLOCK_M, BLOCK_N, num_warps, num_stages]`` for every (head dim, batch, prefix length) case, bf16,
N = 197, 8 tasks, every prefix full; ``ms`` is the kernel's median time. :func:`derive_table` turns it
into :data:`H100_PREFIX`, and a test checks that the two agree, so the table cannot drift from its data.

The sweep predates the paged prefix pool (it read each task's prefix from a padded per-task table);
the kernel's loop and block shapes are unchanged by the pool, which adds one gather of BLOCK_N row
indices per prefix block, so its configurations are kept, not re-measured. A launch picks the measured
case nearest to its (batch, table width P) on a ``log2(1 + x)`` scale: P is the longest prefix of the
loaded tasks, the bound of the longest row's prefix loop, as the sweep's full prefixes of length P were.
fp16 uses the bf16 measurements (same element size). Anything not measured (another GPU, fp32, head
dim 32) gets a conservative default whose shared-memory footprint fits every GPU Triton supports.
Triton's CPU interpreter runs one tiny configuration.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int  # >= 16: tl.dot needs every dimension >= 16
    num_warps: int
    num_stages: int


SWEEP = Path(__file__).resolve().parent / "configs" / "h100-prefix-kernel-sweep.json"
SWEEP_CAPABILITY = (9, 0)
SWEEP_DTYPES = (torch.bfloat16, torch.float16)
# A case's best configuration is kept only if it beats the head dim's best single configuration
# (smallest worst-case slowdown over all its cases) by more than this: fewer distinct compiled
# variants, and no reliance on a single noisy measurement.
TOLERANCE = 1.05

# (head dim, batch, prefix length) -> configuration; derive_table(SWEEP records) gives exactly this.
H100_PREFIX: dict[tuple[int, int, int], LaunchConfig] = {
    (64, 1, 0): LaunchConfig(64, 32, 4, 4),
    (64, 1, 16): LaunchConfig(64, 16, 4, 4),
    (64, 1, 48): LaunchConfig(64, 64, 4, 4),
    (64, 8, 0): LaunchConfig(128, 32, 8, 4),
    (64, 8, 16): LaunchConfig(64, 32, 4, 3),
    (64, 8, 48): LaunchConfig(64, 16, 4, 4),
    (64, 32, 0): LaunchConfig(64, 16, 4, 4),
    (64, 32, 16): LaunchConfig(64, 16, 4, 4),
    (64, 32, 48): LaunchConfig(64, 16, 4, 4),
    (64, 128, 0): LaunchConfig(64, 16, 4, 4),
    (64, 128, 16): LaunchConfig(64, 16, 4, 4),
    (64, 128, 48): LaunchConfig(64, 16, 4, 4),
    (80, 1, 16): LaunchConfig(64, 32, 4, 3),
    (80, 1, 48): LaunchConfig(64, 64, 8, 4),
    (80, 8, 16): LaunchConfig(128, 32, 4, 4),
    (80, 8, 48): LaunchConfig(128, 32, 4, 3),
    (80, 32, 16): LaunchConfig(128, 32, 4, 3),
    (80, 32, 48): LaunchConfig(128, 32, 4, 3),
    (80, 128, 16): LaunchConfig(128, 32, 4, 3),
    (80, 128, 48): LaunchConfig(128, 32, 4, 3),
    (128, 1, 16): LaunchConfig(64, 32, 4, 3),
    (128, 1, 48): LaunchConfig(128, 64, 8, 3),
    (128, 8, 16): LaunchConfig(64, 32, 4, 3),
    (128, 8, 48): LaunchConfig(64, 64, 4, 3),
    (128, 32, 16): LaunchConfig(128, 16, 4, 4),
    (128, 32, 48): LaunchConfig(128, 32, 4, 3),
    (128, 128, 16): LaunchConfig(128, 32, 4, 3),
    (128, 128, 48): LaunchConfig(128, 32, 4, 3),
}

INTERPRETER = LaunchConfig(32, 16, 4, 1)
DEFAULT_16BIT = LaunchConfig(64, 32, 4, 2)
DEFAULT_FP32 = LaunchConfig(32, 32, 4, 2)
# The merge kernel of the cascade streams q and the token output once and the prefix (<= a few blocks)
# from L2; not swept yet: 64-query blocks and one 16- or 32-key block per step.
CASCADE_16BIT = LaunchConfig(64, 16, 4, 2)
CASCADE_WIDE = LaunchConfig(64, 32, 4, 2)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; ``None`` elsewhere (Triton's CPU interpreter)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _nearest(value: int, measured: Iterable[int]) -> int:
    return min(measured, key=lambda point: abs(math.log2(1 + value) - math.log2(1 + point)))


def prefix_config(
    capability: tuple[int, int] | None, head_dim: int, dtype: torch.dtype, batch: int, prefix: int
) -> LaunchConfig:
    """Configuration of the fused prefix kernel for one launch, ``prefix`` the table width P (see above)."""
    if capability is None:
        return INTERPRETER
    measured = {(b, p) for d, b, p in H100_PREFIX if d == head_dim}
    if capability != SWEEP_CAPABILITY or dtype not in SWEEP_DTYPES or not measured:
        return DEFAULT_FP32 if dtype == torch.float32 else DEFAULT_16BIT
    near_b = _nearest(batch, {b for b, _ in measured})
    near_p = _nearest(prefix, {p for b, p in measured if b == near_b})
    return H100_PREFIX[head_dim, near_b, near_p]


def cascade_config(capability: tuple[int, int] | None, dtype: torch.dtype, prefix: int) -> LaunchConfig:
    """The cascade's prefix-and-merge kernel, ``prefix`` the table width P (unmeasured defaults above)."""
    if capability is None:
        return INTERPRETER
    if dtype == torch.float32:
        return DEFAULT_FP32
    return CASCADE_16BIT if prefix <= 16 else CASCADE_WIDE


def derive_table(
    records: Iterable[Mapping[str, Any]], tolerance: float = TOLERANCE
) -> dict[tuple[int, int, int], LaunchConfig]:
    """The per-case table from sweep records ``{"d", "B", "P", "cfg", "ms"}`` (see :data:`TOLERANCE`)."""
    cases: dict[tuple[int, int, int], dict[LaunchConfig, float]] = defaultdict(dict)
    for record in records:
        cases[record["d"], record["B"], record["P"]][LaunchConfig(*record["cfg"])] = record["ms"]
    table = {}
    for head_dim in sorted({d for d, _, _ in cases}):
        own = [timings for (d, _, _), timings in cases.items() if d == head_dim]
        common = set.intersection(*(set(timings) for timings in own))

        def worst_slowdown(config: LaunchConfig, own: list[dict[LaunchConfig, float]] = own) -> float:
            return max(timings[config] / min(timings.values()) for timings in own)

        single = min(sorted(common), key=worst_slowdown)
        for key in sorted(key for key in cases if key[0] == head_dim):
            timings = cases[key]
            best = min(sorted(timings), key=timings.__getitem__)
            table[key] = single if timings[single] <= tolerance * timings[best] else best
    return table

"""Which threads compute with many intra-op threads: the batcher's alone.

PyTorch's OpenMP workers belong to the thread that runs a parallel op, so every extra thread that
computes brings a worker team of its own. Once a process has more OpenMP threads than cores,
libgomp stops spinning between parallel regions and every small op pays a wake-up: a ViT-Ti
forward took 26 ms on the only computing thread and 41 ms on a second one (2 cores). A server
therefore starts up single-threaded, gives the batcher all intra-op threads, and keeps its helper
threads (decoding, task loading, polling) single-threaded.
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def use_compute_threads(threads: int | None = None) -> None:
    """Call on the computing thread: ``threads`` intra-op threads (default: every available core)."""
    _settle()
    torch.set_num_threads(threads or available_cores())


def use_one_thread() -> None:
    """Call on any other thread before it touches torch: it never forms a worker team."""
    _settle()
    torch.set_num_threads(1)


def _settle() -> None:
    """PyTorch gives a thread its OpenMP thread count at the thread's first parallel op, copied from
    whichever thread set one last: a batcher thread that set 2, then computed after a decoding thread
    set 1, ran on one thread (a ViT-Ti forward 52 ms instead of 30). Reading the count first fixes
    this thread's count now, so the count set next is its own."""
    torch.get_num_threads()

"""The computing thread keeps the intra-op threads it asked for, whatever helper threads set later."""

from __future__ import annotations

import threading

import torch

from runtime.serving.threads import use_compute_threads, use_one_thread


def test_compute_threads_survive_a_helper_setting_one() -> None:
    # PyTorch copies the last count any thread set into a thread at its first parallel op: the
    # computing thread sets 2, a helper sets 1, then the computing thread computes for the first time.
    computing_set, helper_set = threading.Event(), threading.Event()
    seen: list[int] = []

    def compute() -> None:
        use_compute_threads(2)
        computing_set.set()
        assert helper_set.wait(10)
        torch.ones(256, 256).sum()
        seen.append(torch.get_num_threads())

    def helper() -> None:
        assert computing_set.wait(10)
        use_one_thread()
        torch.ones(256, 256).sum()
        seen.append(torch.get_num_threads())
        helper_set.set()

    threads = [threading.Thread(target=compute), threading.Thread(target=helper)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == [1, 2]

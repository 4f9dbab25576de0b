"""Batched task heads: one product for a mixed batch, each row's logits independent of its batch-mates."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from runtime.engines.heads import HeadTable, apply_heads, padded_width, split

DIM = 64  # the tiny test backbone's width


@dataclass(frozen=True)
class Entry:
    head_weight: torch.Tensor
    head_bias: torch.Tensor


def make_entry(classes: int, dim: int = DIM, seed: int = 0, device: str = "cpu") -> Entry:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=gen).to(device)
    return Entry(weight, torch.randn(classes, generator=gen).to(device))


def linear(features: torch.Tensor, entry: Entry) -> torch.Tensor:
    return F.linear(features.float(), entry.head_weight, entry.head_bias)


def test_matches_per_row_linear() -> None:
    entries = [make_entry(classes, seed=classes) for classes in (3, 10, 100, 37)]
    rows = [entries[i % 4] for i in range(9)]
    features = torch.randn(9, DIM)
    logits = apply_heads(features, rows)
    assert len(logits) == 9
    for row, (got, entry) in enumerate(zip(logits, rows, strict=True)):
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert got.shape == (entry.head_weight.shape[0],)
        torch.testing.assert_close(got, linear(features[row], entry), atol=1e-6, rtol=1e-6)


def test_row_is_bit_identical_whatever_its_batch_mates() -> None:
    # The same row (features and task) alone, among few or many rows of other tasks, and with heads of
    # widths that change the batch's padded width: the same bits every time.
    gen = torch.Generator().manual_seed(1)
    row_features = torch.randn(DIM, generator=gen)
    own = make_entry(10, seed=10)
    others = [make_entry(classes, seed=classes) for classes in (2, 16, 17, 100, 1000)]
    expected = apply_heads(row_features[None], [own])[0]
    for batch in (2, 3, 8, 33, 64):
        for width_from in others:
            features = torch.randn(batch, DIM, generator=gen)
            position = batch // 2
            features[position] = row_features
            entries = [width_from if row % 2 else others[row % 3] for row in range(batch)]
            entries[position] = own
            assert torch.equal(apply_heads(features, entries)[position], expected), (batch, width_from)


def test_reduced_precision_features_give_fp32_logits() -> None:
    entry = make_entry(5)
    features = torch.randn(2, DIM).to(torch.bfloat16)
    (first, second) = apply_heads(features, [entry, entry])
    assert first.dtype == torch.float32
    torch.testing.assert_close(second, linear(features[1], entry), atol=1e-6, rtol=1e-6)
    assert apply_heads(features[:0], []) == []


def test_head_table_write_apply_split() -> None:
    table = HeadTable.allocate(slots=4, max_classes=20, dim=DIM, device="cpu")
    assert table.max_classes == padded_width(20) == 32
    narrow, wide = make_entry(3, seed=3), make_entry(20, seed=20)
    table.write(1, narrow.head_weight, narrow.head_bias)
    table.write(3, wide.head_weight, wide.head_bias)
    assert table.class_counts.tolist() == [0, 3, 0, 20]
    features = torch.randn(3, DIM)
    logits = table.apply(features, torch.tensor([3, 1, 3], dtype=torch.int32))
    assert logits.shape == (3, 32) and logits.dtype == torch.float32
    assert torch.equal(logits[1, 3:], torch.zeros(29))  # padding classes are exact zeros
    rows = split(logits, [20, 3, 20])
    for row, entry in zip(rows, (wide, narrow, wide), strict=True):
        assert row.shape == (entry.head_weight.shape[0],)
    for row, (got, entry) in enumerate(zip(rows, (wide, narrow, wide), strict=True)):
        torch.testing.assert_close(got, linear(features[row], entry), atol=1e-6, rtol=1e-6)

    # Rewriting a slot with a narrower head clears the classes it no longer has.
    table.write(3, narrow.head_weight, narrow.head_bias)
    assert torch.equal(table.apply(features[:1], torch.tensor([3]))[0, 3:], torch.zeros(29))


def test_head_table_refuses_what_does_not_fit_and_grows() -> None:
    table = HeadTable.allocate(slots=2, max_classes=16, dim=DIM, device="cpu")
    small, big = make_entry(4, seed=4), make_entry(40, seed=40)
    table.write(0, small.head_weight, small.head_bias)
    with pytest.raises(ValueError, match="grow it first"):
        table.write(0, big.head_weight, big.head_bias)
    with pytest.raises(ValueError, match="grow it first"):
        table.write(2, small.head_weight, small.head_bias)
    with pytest.raises(ValueError, match=r"weight \[C, 64\]"):
        table.write(1, torch.zeros(4, DIM + 1), torch.zeros(4))

    grown = table.grown(slots=3, max_classes=40)
    assert (grown.slots, grown.max_classes) == (3, 48)
    grown.write(2, big.head_weight, big.head_bias)
    features = torch.randn(2, DIM)
    logits = grown.apply(features, torch.tensor([0, 2]))
    before = table.apply(features[:1], torch.tensor([0]))
    assert torch.equal(logits[0, :4], before[0, :4])
    assert grown.class_counts.tolist() == [4, 0, 40]


def test_engine_base_uses_the_batched_heads() -> None:
    from runtime.engines import base, heads

    assert base.apply_heads is heads.apply_heads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_heads_fp32_bound() -> None:
    # On the GPU a row's logits may differ between batches only by fp32 rounding: tested bound
    # |diff| <= 1e-5 * max |logit| of the row, against float64 and against the row computed alone.
    dim = 768
    entries = [make_entry(classes, dim=dim, seed=classes, device="cuda") for classes in (10, 100, 1000, 37)]
    rows = [entries[(7 * i) % 4] for i in range(256)]
    features = torch.randn(256, dim, device="cuda")
    logits = apply_heads(features, rows)
    for row in (0, 1, 2, 3, 255):
        entry = rows[row]
        exact = F.linear(features[row].double(), entry.head_weight.double(), entry.head_bias.double()).cpu()
        alone = apply_heads(features[row : row + 1], [entry])[0]
        bound = 1e-5 * exact.abs().max().item()
        torch.testing.assert_close(logits[row].double(), exact, atol=bound, rtol=0)
        torch.testing.assert_close(logits[row], alone, atol=bound, rtol=0)

"""exact_sums: the float64 summation shared by the window average's re-sum and the offline average."""

from __future__ import annotations

import pytest
import torch

from checkpoint_stability.averaging import WindowAverage
from checkpoint_stability.exact_sums import exact_sum, row_blocks
from checkpoint_stability.state_dicts import CapturedState


def test_pieces_are_summed_wide_in_order_and_keep_their_dtype():
    bf16 = [torch.tensor([1.0, -2.5], dtype=torch.bfloat16), torch.tensor([3.0, 0.5], dtype=torch.bfloat16)]
    summed = exact_sum(iter(bf16))
    assert summed.total.dtype == torch.float64 and summed.n == 2 and summed.dtype == torch.bfloat16
    assert summed.total.tolist() == [4.0, -2.0]
    complex_sum = exact_sum([torch.tensor([1 + 2j], dtype=torch.complex64)] * 3)
    assert complex_sum.total.dtype == torch.complex128 and complex_sum.total.tolist() == [3 + 6j]


def test_float8_pieces_are_widened_before_they_are_added():
    pieces = [torch.tensor([0.5, 2.0]).to(torch.float8_e4m3fn) for _ in range(3)]
    summed = exact_sum(pieces)
    assert summed.dtype == torch.float8_e4m3fn and summed.total.tolist() == [1.5, 6.0]


def test_nothing_to_sum_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        exact_sum([])


def test_row_blocks_cover_every_row_in_bounded_blocks():
    assert row_blocks((), 4) == []
    assert row_blocks((0, 3), 4) == []
    assert row_blocks((3, 10), 4) == [(0, 1), (1, 2), (2, 3)]  # at least one row per block
    assert row_blocks((7,), 3) == [(0, 3), (3, 6), (6, 7)]


def test_the_window_re_sum_agrees_with_the_running_sum_on_negative_zero():
    average = WindowAverage(exact_sum_every=1)
    window = [CapturedState({"w": torch.tensor([-0.0, 1.0])}) for _ in range(2)]
    average.update(window[0])
    average.update(window[1], window=lambda: window)
    running = average.mean()["w"]
    average.reset(window)
    assert torch.equal(average.mean()["w"].signbit(), running.signbit())
    assert average.mean()["w"].signbit().tolist() == [True, False]

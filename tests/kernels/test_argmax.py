"""The C++ row argmax (greedy sampling) against torch.argmax, ties and NaN included."""

from __future__ import annotations

import pytest
import torch

from kvloom.kernels import argmax_rows
from kvloom.kernels.cpu_ops import load_cpu_ops

ops = load_cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="C++ CPU kernels unavailable")


@pytest.mark.parametrize(("rows", "n"), [(1, 1), (3, 7), (64, 49152), (5, 1000)])
def test_matches_torch(rows, n):
    g = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, n, generator=g)
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))


def test_ties_nan_inf_and_strides():
    x = torch.zeros(6, 300)
    x[0, [5, 17, 200]] = 3.0  # ties: the first index wins
    x[1] = float("-inf")  # all -inf: index 0
    x[2, 250] = float("inf")
    x[3, [40, 90]] = float("nan")  # NaN wins over any number, the first NaN
    x[3, 10] = 99.0
    x[4, 299] = float("nan")
    x[5, 0] = 1.0
    want = x.argmax(dim=-1)
    assert want.tolist() == [5, 0, 250, 40, 299, 0]
    assert torch.equal(ops.argmax_rows(x), want)
    # A column slice (the sampler cuts padded vocab) and the dispatcher's fallbacks.
    wide = torch.randn(4, 130)
    assert torch.equal(argmax_rows(wide[:, :100]), wide[:, :100].argmax(dim=-1))
    half = wide.to(torch.bfloat16)
    assert torch.equal(argmax_rows(half), half.argmax(dim=-1))

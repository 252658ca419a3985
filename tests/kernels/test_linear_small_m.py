"""The C++ float32 linear kernels (kernels/cpu/gemm.cpp) against torch's F.linear."""

from __future__ import annotations

import pytest
import torch

from kvloom.kernels import (
    KERNEL_MAX_ROWS,
    bf16_dot_products,
    dense_linear,
    pack_linear_weight,
    packed_linear,
    packed_rows,
)
from kvloom.kernels.cpu_ops import load_cpu_ops

ops = load_cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="C++ CPU kernels unavailable")


# 1-4 rows take the weight-stream path, more the packed 6 x 16 tiles (every remainder of 6; more
# than two 288-row blocks of x; widths that are not a multiple of 16; K past one 256-wide slice, in
# equal slices with a shorter last one, and not a multiple of 8; K = 0, an empty sum).
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 16, 40, 257, 600])
@pytest.mark.parametrize(("k", "n"), [(8, 4), (37, 5), (576, 960), (1000, 4097), (3, 1), (300, 33), (0, 5)])
def test_matches_f_linear(rows, k, n):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    want = torch.nn.functional.linear(x, w, b)
    got = ops.linear_small_m(x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * k**0.5)
    torch.testing.assert_close(ops.linear_small_m(x, w, None), want - b, rtol=1e-5, atol=1e-4 * k**0.5)


def test_dense_linear_dispatch():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    for rows in (1, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1):
        x = torch.randn(rows, 32, generator=g)
        torch.testing.assert_close(dense_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    # A non-contiguous input, a 3-D input and half precision take the right path too.
    x = torch.randn(32, 4, generator=g).T
    torch.testing.assert_close(dense_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 32, generator=g)
    torch.testing.assert_close(dense_linear(x3, w), x3 @ w.T, rtol=1e-5, atol=1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    assert dense_linear(xb, wb).dtype == torch.bfloat16


# Weights packed once into [N / 16, K, 16] panels (what the engine's float32 CPU layers hold): the
# few-rows panel stream for 1-4 rows (K odd for the last single step), the register tiles above,
# and no row limit (the row-major weight is gone, so no BLAS fallback).
@pytest.mark.skipif(ops is None or not ops.packed_linear_available(), reason="needs the AVX2 build")
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 11, 600, 2049])
@pytest.mark.parametrize(("k", "n"), [(8, 4), (37, 5), (576, 960), (1000, 4097), (3, 1), (300, 33), (0, 5)])
def test_packed_weights_match_f_linear(rows, k, n):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    packed = pack_linear_weight(w)
    assert packed.shape == (-(-n // 16), k, 16)
    want = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(packed_linear(x, packed, n, b), want, rtol=1e-5, atol=1e-4 * k**0.5)
    torch.testing.assert_close(packed_linear(x, packed, n), want - b, rtol=1e-5, atol=1e-4 * k**0.5)
    ids = torch.randint(0, n, (3, 5), generator=g)
    torch.testing.assert_close(packed_rows(packed, ids), torch.nn.functional.embedding(ids, w), rtol=0, atol=0)


# bfloat16 panels (the CPU bfloat16 mode): the weight is rounded once, to nearest even; with AVX512_BF16
# (vdpbf16ps) each row of x is rounded too, elsewhere x stays float32. Every product is exact in float32,
# so the result is F.linear of the rounded operands up to float32 summation order.
@pytest.mark.skipif(ops is None or not ops.packed_linear_available(), reason="needs the AVX2 build")
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 23, 24, 600])
@pytest.mark.parametrize(("k", "n"), [(8, 4), (37, 5), (576, 960), (1000, 4097), (3, 1), (300, 33), (0, 5)])
def test_bfloat16_panels_match_f_linear_of_the_rounded_weight(rows, k, n):
    g = torch.Generator().manual_seed(rows * 1000 + k + n + 7)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    packed = pack_linear_weight(w, torch.bfloat16)
    pairs = bf16_dot_products() and k % 2 == 0
    shape = (-(-n // 16), k // 2, 32) if pairs else (-(-n // 16), k, 16)
    assert packed.dtype == torch.bfloat16 and packed.shape == shape
    rounded = w.bfloat16().float()
    want = torch.nn.functional.linear(x.bfloat16().float() if pairs else x, rounded, b)
    torch.testing.assert_close(packed_linear(x, packed, n, b), want, rtol=1e-5, atol=1e-4 * k**0.5)
    ids = torch.randint(0, n, (3, 5), generator=g)
    got = packed_rows(packed, ids)
    assert got.dtype == torch.float32 and torch.equal(got, torch.nn.functional.embedding(ids, rounded))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        pack_linear_weight(w, torch.float16)


@pytest.mark.skipif(ops is None or not ops.packed_linear_available(), reason="needs the AVX2 build")
def test_packed_linear_refuses_what_it_cannot_do():
    w = torch.randn(40, 24)
    packed = pack_linear_weight(w)
    x3 = torch.randn(2, 3, 24)
    torch.testing.assert_close(packed_linear(x3, packed, 40), x3 @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="n does not match"):
        packed_linear(x3, packed, 60)
    with pytest.raises(RuntimeError, match="x \\[M, K\\]"):
        packed_linear(torch.randn(2, 25), packed, 40)
    with pytest.raises(TypeError, match="float32"):
        packed_linear(x3.double(), packed, 40)
    with pytest.raises(RuntimeError, match="no backward"):
        packed_linear(torch.randn(2, 24, requires_grad=True), packed, 40)
    # Panels that do not start on a 32-byte boundary (a view 16 bytes into a buffer), in either dtype.
    for panels in (packed, pack_linear_weight(w, torch.bfloat16)):
        flat = torch.zeros(panels.numel() + 32, dtype=panels.dtype)
        offset = 16 // panels.element_size()
        moved = flat[offset : offset + panels.numel()].view(panels.shape)
        with pytest.raises(RuntimeError, match="32-byte boundary"):
            packed_linear(x3, moved, 40)
    # bfloat16 pair panels (AVX512_BF16) hold K / 2 rows: an odd K of x one short of them is refused.
    if bf16_dot_products():
        pairs = pack_linear_weight(w, torch.bfloat16)
        assert pairs.shape == (3, 12, 32)
        with pytest.raises(RuntimeError, match="x \\[M, K\\]"):
            packed_linear(torch.randn(2, 23), pairs, 40)
    # Nothing to pack: other dtypes, an empty weight.
    assert pack_linear_weight(w.bfloat16()) is None and pack_linear_weight(torch.empty(0, 24)) is None

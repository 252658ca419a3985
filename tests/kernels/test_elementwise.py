"""Fused element-wise CPU kernels against the torch reference."""

from __future__ import annotations

import pytest
import torch

from kvloom.kernels import torch_ref
from kvloom.kernels.cpu_ops import load_cpu_ops


@pytest.fixture(scope="module")
def ops():
    ops = load_cpu_ops()
    if ops is None:
        pytest.skip("no C++ toolchain: the torch path is used")
    return ops


def test_rms_norm_with_and_without_residual(ops):
    x, res, w = torch.randn(37, 96), torch.randn(37, 96), torch.randn(96)
    ref, _ = torch_ref.rms_norm(x, None, w, 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, None, w, 1e-5), ref)
    ref_out, ref_res = torch_ref.rms_norm(x, res, w, 1e-5)
    res2 = res.clone()
    out = ops.rms_norm(x, res2, w, 1e-5)
    torch.testing.assert_close(res2, ref_res)
    torch.testing.assert_close(out, ref_out)


def test_rotary_in_place_on_strided_views(ops):
    heads, kv_heads, d = 4, 2, 32
    qkv = torch.randn(11, (heads + 2 * kv_heads) * d)
    q = qkv[:, : heads * d].view(11, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(11, kv_heads, d)
    freqs = torch.outer(torch.arange(64).float(), torch.rand(d // 2))
    cos, sin = freqs.cos(), freqs.sin()
    pos = torch.randint(0, 64, (11,))
    ref_q, ref_k = torch_ref.rotary_embedding(pos, q.clone(), k.clone(), cos, sin)
    ops.rotary_embedding(pos, q, k, cos, sin)
    torch.testing.assert_close(q, ref_q)
    torch.testing.assert_close(k, ref_k)


def test_silu_and_mul(ops):
    x = torch.randn(19, 2 * 48) * 4
    torch.testing.assert_close(ops.silu_and_mul(x), torch_ref.silu_and_mul(x))

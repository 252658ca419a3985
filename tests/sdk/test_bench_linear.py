"""`kvloom bench linear`: BLAS, the C++ kernel and packed weights side by side, on small shapes."""

from __future__ import annotations

import json

import pytest

from kvloom.bench import linear as bench_linear
from kvloom.kernels import cpu_ops

ops = cpu_ops.load_cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="C++ CPU kernels unavailable")


def test_times_each_path_per_shape_and_row_count(monkeypatch, capsys):
    monkeypatch.setattr(bench_linear, "SHAPES", {"small": (256, 256), "lm_head": (1000, 128)})
    bench_linear.main(["--rows", "1", "6", "--repeats", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["shape"], line["rows"]) for line in lines] == [(s, r) for s in ("small", "lm_head") for r in (1, 6)]
    paths = ("blas", "kernel", "packed", "packed_bf16") if ops.packed_linear_available() else ("blas", "kernel")
    for line in lines:
        for path in paths:
            assert line[f"{path}_us"] > 0 and line[f"{path}_gflop_s"] > 0
        assert line["speedup"] > 0
        if ops.packed_linear_available():
            want = "avx512_bf16 dot products" if ops.bf16_dot_available() else "widened to float32"
            assert line["bf16_gemm"] == want

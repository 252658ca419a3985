"""The embedded default model (SmolLM2-135M-Instruct), fetched and converted on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvloom import LLM, SamplingParams

from kvloom_testing import assert_all_blocks_free

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_llm():
    return LLM(kv_cache_memory_gb=0.5)


def test_capital_of_france_is_paris(default_llm):
    out = default_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # it ends with EOS, not the length limit
    assert_all_blocks_free(default_llm.llm_engine)


def test_greedy_matches_transformers_on_the_default_model(default_llm):
    import torch
    from transformers import AutoModelForCausalLM

    engine = default_llm.llm_engine
    prompt = engine.apply_chat_template([{"role": "user", "content": "Name three colors."}])
    hf = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ref = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=20,
        do_sample=False,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        pad_token_id=2,
    )
    out = default_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[
        0
    ]
    assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist()


def test_cli_generate_prints_the_answer():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvloom.cli",
            "generate",
            "What is the capital of France?",
            "--kv-cache-memory-gb",
            "0.25",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout

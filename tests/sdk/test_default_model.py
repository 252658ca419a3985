"""The embedded default model (SmolLM2-135M-Instruct), fetched and converted on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

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


# The quality gate of the CPU bfloat16 mode (bfloat16 linear weights and KV cache, float32
# activations): greedy answers on a fixed prompt set against float32's, and the France question.
# `dtype="auto"` may choose a precision only if it keeps every greedy answer of the set; measured on
# this model, bfloat16 keeps 14 of 16 (up to 64 tokens each) with the weights widened to float32 (the
# other two part after 11 and 6 tokens) and with AVX512_BF16 dot products over inputs rounded to
# bfloat16 (the CPU question and "Why is the sky blue?" part at their first and second token), so
# auto stays float32 on CPU and bfloat16 is an opt-in (`dtype="bfloat16"`, `--dtype bfloat16`). The
# floor below (12 of 16) guards that figure with room for summation-order changes.
GATE_PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' to Spanish.",
    "What is photosynthesis?",
    "List the planets of the solar system.",
    "How many days are in a leap year?",
    "What is the boiling point of water?",
    "Describe a cat in two sentences.",
    "What does HTTP stand for?",
    "Suggest a name for a pet dog.",
    "Why is the sky blue?",
]


def test_bfloat16_quality_gate(default_llm):
    from kvloom.kernels.cpu_ops import load_cpu_ops

    ops = load_cpu_ops()
    if ops is None or not ops.packed_linear_available():
        pytest.skip("the CPU bfloat16 mode needs the AVX2 build")
    chats = [[{"role": "user", "content": q}] for q in GATE_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=64)
    want = [list(o.outputs[0].token_ids) for o in default_llm.chat(chats, params, use_tqdm=False)]
    bf16 = LLM(dtype="bfloat16", kv_cache_memory_gb=0.5)
    assert bf16.llm_engine.config_info()["activation_dtype"] == "float32"
    outs = bf16.chat(chats, params, use_tqdm=False)
    assert "Paris" in outs[0].outputs[0].text and outs[0].outputs[0].finish_reason == "stop"
    kept = sum(list(o.outputs[0].token_ids) == w for o, w in zip(outs, want))
    assert kept >= 12, f"bfloat16 kept {kept} of {len(GATE_PROMPTS)} greedy answers"
    assert_all_blocks_free(bf16.llm_engine)
    bf16.shutdown()
    # The gate's verdict: auto may choose bfloat16 only if it kept them all.
    assert default_llm.llm_engine.dtype == torch.float32 or kept == len(GATE_PROMPTS)

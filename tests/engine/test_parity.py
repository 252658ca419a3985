"""Greedy output must match transformers token for token (float32), on every scheduling path."""

from __future__ import annotations

import random

import pytest

from kvloom import LLM, SamplingParams

from kvloom_testing import assert_all_blocks_free, peft_greedy

_HF_CACHE: dict = {}


def hf_greedy(model_dir: str, prompt: list[int], n: int) -> list[int]:
    key = (model_dir, tuple(prompt), n)
    if key not in _HF_CACHE:
        # No EOS: generation runs the full n tokens without masking EOS (as ignore_eos does).
        _HF_CACHE[key] = peft_greedy(model_dir, None, prompt, n)
    return _HF_CACHE[key]


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def check(llm: LLM, model_dir: str, batch: list[list[int]], params=GREEDY) -> None:
    outs = llm.generate(batch, params, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt, params.max_tokens)
    assert_all_blocks_free(llm.llm_engine)


# Lengths around the 16-token block boundary, and several blocks long.
BOUNDARY_LENGTHS = [1, 15, 16, 17, 31, 32, 33, 100]


def test_single_prompts_across_block_boundaries(model_dir):
    llm = LLM(model_dir, num_gpu_blocks_override=64)
    for p in prompts(BOUNDARY_LENGTHS):
        check(llm, model_dir, [p])


def test_mixed_batch(model_dir):
    llm = LLM(model_dir, num_gpu_blocks_override=128)
    check(llm, model_dir, prompts(BOUNDARY_LENGTHS, seed=1))


def test_chunked_prefill_small_token_budget(model_dir):
    # 20 tokens per step: long prompts are split into chunks while others decode.
    llm = LLM(model_dir, num_gpu_blocks_override=128, max_num_batched_tokens=20)
    check(llm, model_dir, prompts([100, 45, 7, 33], seed=2))


def test_preemption_with_tiny_kv_cache(model_dir):
    # 12 usable blocks (192 slots) for 4 requests needing up to ~5 blocks each forces preemption.
    llm = LLM(model_dir, num_gpu_blocks_override=13, max_model_len=128)
    batch = prompts([60, 50, 40, 30], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    check(llm, model_dir, batch, params)
    assert llm.llm_engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_matches_transformers(tmp_path, rope_scaling):
    from kvloom_testing import build_tiny_model

    model_dir = build_tiny_model(
        str(tmp_path), seed=3, rope_scaling=rope_scaling, rope_theta=500000.0, tie_word_embeddings=True
    )
    llm = LLM(model_dir, num_gpu_blocks_override=64)
    check(llm, model_dir, prompts([5, 40, 130], seed=6))


def test_bfloat16_without_the_cpu_kernels_runs_on_the_torch_kernels(tiny_llama, monkeypatch):
    # With the C++ kernels, bfloat16 on CPU is the mixed mode (tests/engine/test_cpu_bfloat16.py);
    # without them the whole model runs in bfloat16 on torch's ops.
    import torch

    import kvloom.kernels

    monkeypatch.setattr(kvloom.kernels, "load_cpu_ops", lambda: None)
    llm = LLM(tiny_llama, dtype="bfloat16", num_gpu_blocks_override=32)
    runner = llm.llm_engine.executor.worker.runner
    assert runner.model.layers[0].self_attn.kernels.name == "torch" and runner.dtype == torch.bfloat16
    out = llm.generate(prompts([20, 3]), GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in out)
    assert_all_blocks_free(llm.llm_engine)


def test_prefix_cache_hits_keep_output(model_dir):
    llm = LLM(model_dir, num_gpu_blocks_override=128)
    shared = prompts([40], seed=4)[0]
    batch = [shared + tail for tail in prompts([5, 9, 16], seed=5)] + [shared[:32]]
    check(llm, model_dir, batch[:1])
    check(llm, model_dir, batch)
    assert llm.get_metrics()["prefix_cache_hits"] > 0

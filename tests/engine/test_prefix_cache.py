"""Automatic prefix caching end to end: same outputs with the cache on and off, exact hit counts,
eviction under memory pressure, prompt blocks shared by n > 1 samples, KV accounting."""

from __future__ import annotations

import random

import pytest

from kvloom import LLM, SamplingParams

from kvloom_testing import assert_all_blocks_free

BS = 16


def rand_tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


def shared_prefix_prompts() -> list[list[int]]:
    system = rand_tokens(48, 1)  # exactly three blocks
    prompts = [system + rand_tokens(n, 10 + n) for n in (1, 5, 16, 17, 40)]
    prompts += [system[:32], system[:33], system, system + system[:16]]  # block boundaries, fully cached
    return prompts


@pytest.fixture(scope="module")
def engines(tiny_llama):
    on = LLM(tiny_llama, num_gpu_blocks_override=128, enable_prefix_caching=True)
    off = LLM(tiny_llama, num_gpu_blocks_override=128, enable_prefix_caching=False)
    return on, off


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, seed=5, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_outputs_identical_with_cache_on_and_off(engines, params):
    on, off = engines
    prompts = shared_prefix_prompts()
    # Each prompt alone first (so later ones hit), then all of them again as one batch.
    on_single = [on.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    off_single = [off.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert on_single == off_single
    on_batch = [o.outputs[0].token_ids for o in on.generate(prompts, params, use_tqdm=False)]
    assert on_batch == off_single
    assert on.get_metrics()["prefix_cache_hits"] > 0
    assert off.get_metrics()["prefix_cache_hits"] == 0
    assert_all_blocks_free(on.llm_engine)
    assert_all_blocks_free(off.llm_engine)


def test_exact_hit_counts(tiny_llama):
    llm = LLM(tiny_llama, num_gpu_blocks_override=64)
    greedy = SamplingParams(temperature=0, max_tokens=1)
    base = rand_tokens(40, 3)  # 2 full blocks + 8 tokens
    llm.generate([base], greedy, use_tqdm=False)
    m = llm.get_metrics()
    assert (m["prefix_cache_queries"], m["prefix_cache_hits"]) == (40, 0)
    out = llm.generate([base[:32] + [7, 7]], greedy, use_tqdm=False)[0]
    m = llm.get_metrics()
    assert (m["prefix_cache_queries"], m["prefix_cache_hits"]) == (74, 32)
    assert out.num_cached_tokens == 32
    # A prompt of exactly two cached blocks reuses only the first: its last token must be computed.
    out = llm.generate([base[:32]], greedy, use_tqdm=False)[0]
    assert out.num_cached_tokens == 16
    # The generated token completes nothing new; a different first block shares nothing.
    assert llm.generate([[1] + base[1:32]], greedy, use_tqdm=False)[0].num_cached_tokens == 0
    assert llm.reset_prefix_cache()
    assert llm.generate([base[:32] + [7, 7]], greedy, use_tqdm=False)[0].num_cached_tokens == 0


def test_eviction_under_memory_pressure_keeps_results(tiny_llama):
    # 24 usable blocks; each request needs 6, and 10 prefixes of 4 blocks each (three requests apiece,
    # back to back) are more than the cache holds, so cached blocks are evicted and reused.
    small = LLM(tiny_llama, num_gpu_blocks_override=25, max_model_len=96)
    big = LLM(tiny_llama, num_gpu_blocks_override=256, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [rand_tokens(64, 100 + i // 3) + [i] for i in range(30)]
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in big.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert small.get_metrics()["prefix_cache_hits"] > 0
    assert_all_blocks_free(small.llm_engine)


def test_parallel_samples_share_prompt_blocks(tiny_llama):
    llm = LLM(tiny_llama, num_gpu_blocks_override=64)
    engine = llm.llm_engine
    prompt = rand_tokens(64, 7)  # four full blocks
    engine.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, max_tokens=4, seed=3, ignore_eos=True))
    engine.step()  # all four samples are admitted in one step
    tables = [engine.kv_cache_manager.get_block_ids(f"r#{i}") for i in range(4)]
    shared = tables[0][:3]
    assert all(t[:3] == shared for t in tables)  # the first three blocks are one copy, reference counted
    assert all(engine.kv_cache_manager.pool.blocks[b].ref_cnt == 4 for b in shared)
    # 3 shared blocks + each sample's own last block: 7 in use instead of 16.
    assert engine.kv_cache_manager.num_used_blocks == 3 + 4
    # Prompt tokens computed: 64 for the first sample, 16 for each of the others.
    assert engine.get_metrics()["prompt_tokens"] == 64 + 3 * 16
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(engine)


def test_kv_usage_and_waste_are_reported(tiny_llama):
    llm = LLM(tiny_llama, num_gpu_blocks_override=128)
    prompts = [rand_tokens(n, n) for n in range(20, 120, 7)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    m = llm.get_metrics()
    assert 0 < m["peak_kv_usage"] <= 1
    # Paging wastes less than one block per running sequence: 13 sequences of 50-150 tokens.
    assert 0 <= m["kv_waste_at_peak"] <= m["max_kv_waste"] < 0.25
    assert m["kv_waste_at_peak"] < 13 * 16 / m["peak_used_slots"]
    assert m["num_used_kv_blocks"] == 0 and m["kv_cache_usage_perc"] == 0

"""Sampling, stopping, logprobs and n > 1 through the whole engine on a tiny model."""

from __future__ import annotations

import math

import pytest

from kvloom import LLM, SamplingParams

from kvloom_testing import assert_all_blocks_free


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, num_gpu_blocks_override=256, seed=0)


@pytest.fixture(autouse=True)
def _blocks_free_after(llm):
    yield
    assert_all_blocks_free(llm.llm_engine)


PROMPT = [5, 17, 99, 23, 8, 41, 300, 7]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPT], p, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([PROMPT], p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batched = llm.generate([[9, 9, 9], PROMPT, [1, 2]], [others, p, others], use_tqdm=False)[1]
    assert alone == again == batched.outputs[0].token_ids
    other_seed = (
        llm.generate(
            [PROMPT], SamplingParams(temperature=1.0, max_tokens=20, seed=99, ignore_eos=True), use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
    )
    assert other_seed != alone


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    topk1 = llm.generate(
        [PROMPT], SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True, seed=3), use_tqdm=False
    )
    assert greedy[0].outputs[0].token_ids == topk1[0].outputs[0].token_ids


def test_stop_token_ids_end_output_exactly(llm):
    full = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    ids = full[0].outputs[0].token_ids
    stop_id = ids[5]
    out = llm.generate(
        [PROMPT],
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0].outputs[0]
    first = ids.index(stop_id)
    assert out.token_ids == ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_stop_strings_end_text_exactly(llm):
    full = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    text = full[0].outputs[0].text
    stop = text[6:9]
    assert stop and stop in text
    cut = text.index(stop)
    out = llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(
        [PROMPT],
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == text[: cut + len(stop)]


def test_length_finish_and_max_tokens(llm):
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"
    assert out.finished and out.metrics.first_token_time >= out.metrics.arrival_time
    assert out.metrics.finished_time >= out.metrics.first_token_time


def test_min_tokens_blocks_eos(llm):
    eos = llm.get_tokenizer().eos_token_id
    p = SamplingParams(temperature=0, max_tokens=10, min_tokens=10, stop_token_ids=list(range(0, 512, 2)))
    out = llm.generate([PROMPT], p, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 10
    assert all(t % 2 == 1 and t != eos for t in out.token_ids[:9])


def test_logprobs_and_prompt_logprobs(llm):
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = llm.generate([PROMPT], p, use_tqdm=False)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 5
    for tok, lp in zip(comp.token_ids, comp.logprobs):
        assert tok in lp and lp[tok].rank == 1  # greedy picks the top token
        assert 3 <= len(lp) <= 4
    assert math.isclose(
        comp.cumulative_logprob, sum(lp[t].logprob for t, lp in zip(comp.token_ids, comp.logprobs)), rel_tol=1e-5
    )
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for tok, lp in zip(PROMPT[1:], out.prompt_logprobs[1:]):
        assert tok in lp


def test_n_samples_and_best_of(llm):
    p = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    out = llm.generate([PROMPT], p, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    best = llm.generate(
        [PROMPT], SamplingParams(n=2, best_of=4, temperature=1.0, max_tokens=6, seed=1, ignore_eos=True), use_tqdm=False
    )[0]
    assert len(best.outputs) == 2
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob


def test_penalties_change_output(llm):
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = llm.generate([PROMPT], base, use_tqdm=False)[0].outputs[0].token_ids
    rep = llm.generate([PROMPT], base.clone(repetition_penalty=5.0), use_tqdm=False)[0].outputs[0].token_ids
    freq = llm.generate([PROMPT], base.clone(frequency_penalty=2.0), use_tqdm=False)[0].outputs[0].token_ids
    assert rep != plain or freq != plain

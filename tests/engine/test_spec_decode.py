"""Speculative decoding (n-gram prompt lookup) against plain decoding, and the long-prefill bound."""

from __future__ import annotations

import contextlib

import pytest
import torch

from kvloom import LLM, SamplingParams
from kvloom.engine.config import SchedulerConfig, SpeculativeConfig
from kvloom.engine.sampler import Sampler, SamplingState
from kvloom.engine.spec_decode import NgramProposer

from kvloom_testing import assert_all_blocks_free

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
# Prompts that repeat themselves, so the tiny random model's continuation has n-grams to look up.
PROMPTS = [
    [5, 17, 99, 23, 8, 41, 300, 7] * 3,
    [11, 12, 13, 14, 11, 12, 13, 14, 11, 12],
    [200, 201, 5, 17, 99, 23, 200, 201, 5],
    list(range(40, 80)) + list(range(40, 60)),
]


@pytest.fixture(scope="module")
def plain(tiny_llama):
    return LLM(tiny_llama, num_gpu_blocks_override=256, seed=0)


@pytest.fixture(scope="module")
def spec(tiny_llama):
    return LLM(tiny_llama, num_gpu_blocks_override=256, seed=0, speculative_config=NGRAM)


def _tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


class OracleProposer:
    """Guesses the true greedy continuation (known from a plain run), spoiling every third guess
    run at its third token: a tiny random model copies too little for n-gram lookup to test
    long accepted runs, stops inside them, and rejections after an accepted prefix."""

    def __init__(self, prompts, outputs, k: int = 4) -> None:
        self.full = [list(p) + list(o) for p, o in zip(prompts, outputs)]
        self.k, self.calls = k, 0

    def propose(self, tokens: list[int], room: int) -> list[int]:
        for full in self.full:
            if full[: len(tokens)] == tokens:
                guess = full[len(tokens) : len(tokens) + min(self.k, room)]
                self.calls += 1
                if self.calls % 3 == 0 and len(guess) >= 3:
                    guess[2] = (guess[2] + 1) % 500
                return guess
        return []


@contextlib.contextmanager
def oracle(llm, prompts, outputs):
    core = llm.llm_engine.core
    saved, core.proposer = core.proposer, OracleProposer(prompts, outputs)
    try:
        yield core.proposer
    finally:
        core.proposer = saved


def test_proposer_takes_the_latest_match_of_the_longest_suffix():
    p = NgramProposer(SpeculativeConfig(3, prompt_lookup_max=3, prompt_lookup_min=2))
    assert p.propose([1, 2, 3, 4, 5, 9, 2, 3], 8) == [4, 5, 9]
    # Two earlier matches of (2, 3): the latest wins; the 3-gram (1, 2, 3) beats both.
    assert p.propose([2, 3, 7, 2, 3, 8, 5, 2, 3], 8) == [8, 5, 2]
    assert p.propose([1, 2, 3, 9, 1, 2, 3], 8) == [9, 1, 2]
    assert p.propose([1, 2, 3, 4], 8) == []  # no repeated n-gram
    assert p.propose([1, 2, 3, 4, 5, 9, 2, 3], 1) == [4]  # capped by the room left
    assert p.propose([1, 2, 3, 4, 5, 9, 2, 3], 0) == []


def test_config_refuses_what_is_not_implemented():
    assert SpeculativeConfig.from_user('{"method": "ngram", "num_speculative_tokens": 2}').num_speculative_tokens == 2
    cases = [
        ({"method": "draft_model", "model": "x", "num_speculative_tokens": 2}, "not implemented"),
        ({"model": "some/draft", "num_speculative_tokens": 2}, "not implemented"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "not implemented"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, "draft_tensor_parallel"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 1, "prompt_lookup_min": 3}, "max"),
        ("{not json", "JSON"),
    ]
    for value, needle in cases:
        with pytest.raises(ValueError, match=needle):
            SpeculativeConfig.from_user(value)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(enable_chunked_prefill=False, max_num_batched_tokens=4096, long_prefill_token_threshold=64)


def test_greedy_output_is_identical_and_guesses_are_accepted(plain, spec):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    before = spec.llm_engine.get_metrics()
    assert _tokens(spec, PROMPTS, params) == _tokens(plain, PROMPTS, params)
    after = spec.llm_engine.get_metrics()
    drafted = after["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
    accepted = after["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
    assert drafted > 0 and 0 < accepted <= drafted
    # Fewer steps than tokens: accepted guesses saved forward passes.
    assert after["generation_tokens"] - before["generation_tokens"] == 40 * len(PROMPTS)
    assert_all_blocks_free(spec.llm_engine)


def test_stops_and_limits_are_exact_with_guesses(plain, spec):
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = _tokens(plain, PROMPTS, base)
    with oracle(spec, PROMPTS, full):
        _check_stops(plain, spec, full, base)
    assert_all_blocks_free(spec.llm_engine)


def _check_stops(plain, spec, full, base):
    before = spec.llm_engine.get_metrics()["spec_num_accepted_tokens"]
    # A stop token and a max_tokens that fall inside an accepted run of guesses.
    for i, ids in enumerate(full):
        stop = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[ids[17]])
        assert _tokens(spec, [PROMPTS[i]], stop) == _tokens(plain, [PROMPTS[i]], stop)
    for n in (1, 2, 7, 13):
        short = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        assert _tokens(spec, PROMPTS, short) == [ids[:n] for ids in full]
    # Stop strings end the text at the same place.
    text = plain.generate([PROMPTS[0]], base, use_tqdm=False)[0].outputs[0].text
    if len(text) > 12:
        stop_str = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[text[8:12]])
        a = spec.generate([PROMPTS[0]], stop_str, use_tqdm=False)[0].outputs[0]
        b = plain.generate([PROMPTS[0]], stop_str, use_tqdm=False)[0].outputs[0]
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
    assert spec.llm_engine.get_metrics()["spec_num_accepted_tokens"] > before + 100


def test_mixed_batch_with_logprobs_penalties_and_tight_budget(tiny_llama, plain):
    """Requests that cannot speculate decode normally beside those that do; chunked prefill,
    prefix caching and preemption (a small cache) keep the outputs equal to plain decoding."""
    llm = LLM(
        tiny_llama,
        num_gpu_blocks_override=8,
        max_num_batched_tokens=16,
        seed=0,
        speculative_config=NGRAM,
    )
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, min_tokens=10),
    ]
    want = plain.generate(PROMPTS, params, use_tqdm=False)
    want_ids = [o.outputs[0].token_ids for o in want]
    with oracle(llm, PROMPTS, want_ids):
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == want_ids
        assert got[1].outputs[0].logprobs is not None and len(got[1].outputs[0].logprobs) == 24
        # Again, now hitting the prefix cache.
        again = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == want_ids
    m = llm.llm_engine.get_metrics()
    assert m["spec_num_accepted_tokens"] > 0, m
    assert m["prefix_cache_hits"] > 0, m
    assert m["num_preemptions"] > 0, m
    assert_all_blocks_free(llm.llm_engine)


def test_sampled_requests_are_seeded_and_valid(spec):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=30, seed=7, ignore_eos=True)
    a = _tokens(spec, PROMPTS, params)
    assert a == _tokens(spec, PROMPTS, params)
    assert all(len(ids) == 30 for ids in a)


def _tv(samples: torch.Tensor, probs: torch.Tensor) -> float:
    freq = torch.bincount(samples, minlength=probs.numel()).double() / samples.numel()
    return 0.5 * float((freq - probs.double()).abs().sum())


def test_rejection_sampling_preserves_the_distribution():
    """Each emitted token is distributed as the target: the first always, the bonus given acceptance."""
    vocab, n = 6, 10000
    torch.manual_seed(0)
    logits = torch.randn(2, vocab) * 1.5
    params = SamplingParams(temperature=0.7, top_k=5, seed=1)
    sampler = Sampler(vocab, seed=0)
    from kvloom.engine.sampler import _probs

    target = _probs(logits, [params, params])
    state = SamplingState(params, [1, 2], generator=torch.Generator().manual_seed(1))
    draft = int(target[0].argmin())  # an unlikely guess exercises the residual path
    for guess in (draft, int(target[0].argmax())):
        outs = [sampler.verify(logits, state, [guess]) for _ in range(n)]
        first = torch.tensor([o[0] for o in outs])
        assert _tv(first, target[0]) < 0.03
        bonus = torch.tensor([o[1] for o in outs if len(o) == 2])
        assert all(o[0] == guess for o in outs if len(o) == 2)
        if bonus.numel() > 2000:
            assert _tv(bonus, target[1]) < 0.05
    # Greedy: the guess is kept exactly when it is the argmax.
    greedy = SamplingState(SamplingParams(temperature=0), [1])
    best = int(logits[0].argmax())
    assert sampler.verify(logits, greedy, [best]) == [best, int(logits[1].argmax())]
    assert sampler.verify(logits, greedy, [(best + 1) % vocab]) == [best]


def test_long_prefill_threshold_bounds_prompt_chunks(tiny_llama, plain):
    llm = LLM(tiny_llama, num_gpu_blocks_override=256, seed=0, long_prefill_token_threshold=8)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    steps = []
    scheduler = llm.llm_engine.scheduler
    schedule = scheduler.schedule
    scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]
    try:
        got = _tokens(llm, PROMPTS, params)
    finally:
        del scheduler.schedule
    assert got == _tokens(plain, PROMPTS, params)
    chunks = [len(s.token_ids) for out in steps for s in out.seqs if len(s.token_ids) > 1]
    assert chunks and max(chunks) == 8
    assert llm.llm_engine.config_info()["long_prefill_token_threshold"] == "8"
    assert_all_blocks_free(llm.llm_engine)

"""Scheduler without a model: budgets, chunked prefill, continuous batching and preemption."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvloom.engine.config import SchedulerConfig
from kvloom.engine.kv_cache.manager import KVCacheManager
from kvloom.engine.request import Request, RequestStatus
from kvloom.engine.sampling_params import SamplingParams
from kvloom.engine.scheduler.output import ModelRunnerOutput
from kvloom.engine.scheduler.scheduler import Scheduler


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32, max_len=256, caching=True):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len), kv)


def req(rid, n_prompt, max_tokens=4, first_token=1):
    return Request(
        rid,
        list(range(first_token, first_token + n_prompt)),
        SamplingParams(ignore_eos=True),
        eos_token_id=0,
        max_tokens=max_tokens,
    )


def fake_step(s: Scheduler, token=7):
    out = s.schedule()
    sampled = [seq.req_id for seq in out.seqs if seq.do_sample]
    s.update(out, ModelRunnerOutput(req_ids=sampled, sampled_token_ids=[token] * len(sampled)))
    return out


def test_budget_splits_long_prompt_into_chunks():
    s = make(budget=10)
    s.add_request(req("a", 25))
    chunks = [fake_step(s).seqs[0] for _ in range(3)]
    assert [len(c.token_ids) for c in chunks] == [10, 10, 5]
    assert [c.start_pos for c in chunks] == [0, 10, 20]
    assert [c.do_sample for c in chunks] == [False, False, True]


def test_new_requests_join_while_others_decode():
    s = make(budget=16)
    s.add_request(req("a", 8, max_tokens=10))
    fake_step(s)
    s.add_request(req("b", 8, first_token=50))
    out = fake_step(s)
    assert [(q.req_id, len(q.token_ids)) for q in out.seqs] == [("a", 1), ("b", 8)]
    assert [r.req_id for r in out.new_requests] == ["b"]


def test_max_num_seqs_caps_running():
    s = make(max_seqs=2, budget=100)
    for i in range(4):
        s.add_request(req(f"r{i}", 4))
    out = fake_step(s)
    assert len(out.seqs) == 2 and len(s.waiting) == 2


def test_preemption_frees_blocks_and_resumes_with_all_tokens():
    s = make(num_blocks=5, block_size=4, budget=64)  # 4 usable blocks = 16 slots
    s.add_request(req("a", 6, max_tokens=8))
    s.add_request(req("b", 6, max_tokens=8))
    preempted = []
    while s.has_unfinished_requests():
        out = fake_step(s)
        preempted += out.preempted_req_ids
    assert preempted == ["b"] or preempted[:1] == ["b"]
    assert s.kv.num_free_blocks == 4


def test_finish_requests_releases_waiting_and_running():
    s = make()
    s.add_request(req("a", 4, max_tokens=50))
    s.add_request(req("b", 4))
    fake_step(s)
    s.add_request(req("c", 4))
    ended = s.finish_requests(["a", "c", "zzz"], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in ended} == {"a", "c"}
    assert s.schedule().finished_req_ids == {"a"}  # c never reached the runner
    assert [r.request_id for r in s.running] == ["b"]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(4, 40), st.integers(6, 40))
def test_random_workloads_finish_with_exact_lengths_and_no_leaks(seed, budget, num_blocks):
    rng = random.Random(seed)
    s = make(num_blocks=num_blocks, block_size=4, max_seqs=rng.randint(1, 6), budget=budget, max_len=64)
    expected = {}
    pending = []
    for i in range(rng.randint(1, 8)):
        n_prompt = rng.randint(1, 20)
        max_tokens = rng.randint(1, 12)
        if -(-(n_prompt + max_tokens) // 4) > num_blocks - 1:
            continue
        expected[f"r{i}"] = max_tokens
        pending.append(req(f"r{i}", n_prompt, max_tokens, first_token=i * 100))
    done = {}
    for _ in range(2000):
        if pending and rng.random() < 0.5:
            s.add_request(pending.pop())
        if not s.has_unfinished_requests() and not pending:
            break
        out = s.schedule()
        assert out.num_batched_tokens <= budget
        sampled = [q.req_id for q in out.seqs if q.do_sample]
        for r, _ in s.update(out, ModelRunnerOutput(sampled, [5] * len(sampled))):
            if r.is_finished:
                done[r.request_id] = r.num_output_tokens
        held = sum(len(b) for b in s.kv.req_blocks.values())
        assert held + s.kv.num_free_blocks == s.kv.pool.num_usable_blocks
    assert done == expected
    assert s.kv.num_free_blocks == s.kv.pool.num_usable_blocks

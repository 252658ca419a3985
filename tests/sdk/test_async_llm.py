"""AsyncLLM: concurrent streams from event loops and threads over one background step loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvloom import LLM, AsyncLLM, RequestOutputKind, SamplingParams, get_engine, shutdown_engines

from kvloom_testing import assert_all_blocks_free

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
DELTA = GREEDY.clone(output_kind=RequestOutputKind.DELTA)
PROMPTS = [[5, 6, 7], [100, 200, 300, 400], [9] * 20, [42, 43]]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = AsyncLLM(model=tiny_llama, num_gpu_blocks_override=128)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_llama):
    llm = LLM(tiny_llama, num_gpu_blocks_override=128)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def wait_idle(engine: AsyncLLM) -> None:
    for _ in range(200):
        if not engine.engine.has_unfinished_requests():
            return
        threading.Event().wait(0.01)


def test_concurrent_async_streams_match_offline(engine, expected):
    async def one(i):
        chunks = [out async for out in engine.generate(PROMPTS[i], DELTA, request_id=f"a{i}")]
        return chunks

    async def main():
        return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))

    results = asyncio.run(main())
    for chunks, want in zip(results, expected):
        assert len(chunks) == len(want)  # one delta per step: real streaming
        assert [t for c in chunks for t in c.outputs[0].token_ids] == want
        assert chunks[-1].finished and not chunks[0].finished
    assert_all_blocks_free(engine.engine)


def test_threads_and_event_loops_share_one_engine(engine, expected):
    results: dict[int, list[int]] = {}

    def sync_caller(i):
        final = list(engine.stream(PROMPTS[i], GREEDY))[-1]
        results[i] = final.outputs[0].token_ids

    def async_caller(i):
        async def run():
            outs = [o async for o in engine.generate(PROMPTS[i], GREEDY)]
            return outs[-1].outputs[0].token_ids

        results[i] = asyncio.run(run())

    threads = [threading.Thread(target=sync_caller if i % 2 else async_caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(4)] == expected
    assert_all_blocks_free(engine.engine)


def test_consumer_that_stops_early_aborts_and_frees_blocks(engine):
    async def main():
        gen = engine.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await gen.aclose()

    asyncio.run(main())
    wait_idle(engine)
    assert_all_blocks_free(engine.engine)


def test_bad_input_raises_and_engine_keeps_serving(engine, expected):
    with pytest.raises(ValueError, match="empty"):
        next(engine.stream("", GREEDY))
    with pytest.raises(ValueError, match="max_model_len"):
        next(engine.stream([1] * 600, GREEDY))
    assert list(engine.stream(PROMPTS[0], GREEDY))[-1].outputs[0].token_ids == expected[0]


def test_a_failing_step_fails_only_its_culprit(engine, expected, monkeypatch):
    runner = engine.engine.executor.worker.runner
    real = runner.execute_model
    calls = {"n": 0}

    def flaky(out):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected transient failure")
        return real(out)

    # A failure that does not come back when the step is re-run blames nobody: the request goes on.
    monkeypatch.setattr(runner, "execute_model", flaky)
    assert list(engine.stream(PROMPTS[0], GREEDY))[-1].outputs[0].token_ids == expected[0]

    def poisoned(out):
        # Every step that computes the prompt [7, 7, 7] raises: that request is the culprit.
        prompts = {n.req_id: n.prompt_token_ids for n in out.new_requests}
        prompts.update({rid: state.prompt_token_ids for rid, state in runner.states.items() if rid not in prompts})
        if any(prompts.get(s.req_id) == [7, 7, 7] for s in out.seqs):
            raise RuntimeError("injected kernel failure")
        return real(out)

    monkeypatch.setattr(runner, "execute_model", poisoned)
    others = [engine.stream(p, GREEDY) for p in PROMPTS[:2]]
    first = [next(s) for s in others]  # both are running when the culprit arrives
    with pytest.raises(RuntimeError, match="injected kernel failure"):
        list(engine.stream([7, 7, 7], GREEDY))
    for stream, head, want in zip(others, first, expected[:2]):
        assert ([head] + list(stream))[-1].outputs[0].token_ids == want
    assert_all_blocks_free(engine.engine)


def test_get_engine_shares_one_engine_per_configuration(tiny_llama, tiny_qwen2):
    try:
        a = get_engine(tiny_llama, num_gpu_blocks_override=32)
        assert get_engine(tiny_llama, num_gpu_blocks_override=32) is a
        b = get_engine(tiny_qwen2, num_gpu_blocks_override=32)
        assert b is not a
    finally:
        shutdown_engines()
    assert not a.is_running
    with pytest.raises(RuntimeError, match="shut down"):
        next(a.stream([1, 2], GREEDY))

"""One request can never hurt another: a request that breaks the engine step fails alone; disconnects
abort; threads share an LLM safely."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import openai
import pytest

from kvloom import LLM, SamplingParams

from kvloom_testing import RELIABILITY_KEY as KEY
from kvloom_testing import RELIABILITY_MODEL as MODEL
from kvloom_testing import assert_all_blocks_free, assert_openai_error, normal_request_works, wait_idle

MARKER_SEED = 424242  # the injected fault breaks every step that computes a request with this seed


@pytest.fixture
def faulty_model(engine):
    runner = engine.engine.executor.worker.runner
    real = runner.execute_model

    def execute(out):
        seeds = {n.req_id: n.sampling_params.seed for n in out.new_requests}
        seeds.update({rid: state.params.seed for rid, state in runner.states.items() if rid not in seeds})
        if any(seeds.get(s.req_id) == MARKER_SEED for s in out.seqs):
            raise RuntimeError("injected model fault")
        return real(out)

    runner.execute_model = execute
    yield
    runner.execute_model = real


def test_a_failing_request_among_ten_in_flight_fails_alone(server, engine, faulty_model):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)

        async def good(i):
            stream = await client.completions.create(
                model=MODEL,
                prompt=f"Request {i}",
                max_tokens=24,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            return "".join([c.choices[0].text async for c in stream if c.choices])

        goods = [asyncio.ensure_future(good(i)) for i in range(10)]
        await asyncio.sleep(0.3)  # the ten are decoding when the bad one arrives
        with pytest.raises(openai.InternalServerError, match="injected model fault"):
            await client.completions.create(model=MODEL, prompt="bad", max_tokens=8, seed=MARKER_SEED)
        bad_stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "bad"}], max_tokens=8, seed=MARKER_SEED, stream=True
        )
        with pytest.raises(openai.APIError, match="injected model fault"):
            async for _ in bad_stream:
                pass
        return await asyncio.gather(*goods)

    texts = asyncio.run(main())
    reference = LLM(engine.engine_args.model, num_gpu_blocks_override=64, max_model_len=256)
    expected = [
        o.outputs[0].text
        for o in reference.generate(
            [f"Request {i}" for i in range(10)],
            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            use_tqdm=False,
        )
    ]
    assert texts == expected


def test_a_non_streamed_request_is_aborted_when_its_client_leaves(server, engine, http):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True}
    slow = engine.engine.executor.worker.runner.execute_model

    def throttled(out):  # ~20 ms a step: the request would run ~4 s
        time.sleep(0.02)
        return slow(out)

    engine.engine.executor.worker.runner.execute_model = throttled
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.base_url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5
            )
        t0 = time.monotonic()
        wait_idle(engine.engine, timeout=3)
        assert time.monotonic() - t0 < 2
    finally:
        engine.engine.executor.worker.runner.execute_model = slow
    normal_request_works(http)


def test_stream_disconnects_log_no_errors(server, engine, caplog):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with caplog.at_level(logging.INFO):
        for _ in range(12):
            with httpx.stream("POST", f"{server.base_url}/completions", json=body, headers=headers) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        break  # leave after the first chunk
        wait_idle(engine.engine)
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not problems, [r.getMessage() for r in problems]
    assert sum("disconnected" in r.getMessage() for r in caplog.records) <= 12


def test_one_llm_serves_several_threads(tiny_llama):
    llm = LLM(tiny_llama, num_gpu_blocks_override=128)
    prompts = [[5 + i, 6, 7] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def run(i):
        try:
            start.wait()
            for _ in range(3):
                out = llm.generate([prompts[i]], params, use_tqdm=False)
                results.setdefault(i, []).append(out[0].outputs[0].token_ids)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(results[i] == [expected[i]] * 3 for i in range(6))
    wait_idle(llm.llm_engine)
    assert_all_blocks_free(llm.llm_engine)


def test_culprit_over_http_is_a_500_in_openai_shape(server, http, faulty_model):
    body = {"model": MODEL, "prompt": "bad", "max_tokens": 4, "seed": MARKER_SEED}
    error = assert_openai_error(http.post("/v1/completions", json=body), 500)
    assert "injected model fault" in error["message"]
    normal_request_works(http)

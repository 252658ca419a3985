"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import kvloom
from kvloom import LLM, AsyncLLM

from kvloom_testing import assert_all_blocks_free, served_openai_fixtures

MODEL = "tiny"


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = AsyncLLM(model=tiny_llama, num_gpu_blocks_override=128, max_model_len=256)
    yield eng
    eng.shutdown()


server, client = served_openai_fixtures(MODEL)


def wait_idle(engine: AsyncLLM, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while engine.engine.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.02)


def test_completion_text_and_exact_usage(client, engine):
    prompt = "The quick brown fox"
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(engine.get_tokenizer().encode(prompt))
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].text, str)
    offline = LLM(engine.engine_args.model, num_gpu_blocks_override=64).generate(
        [prompt], kvloom.SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False
    )
    assert r.choices[0].text == offline[0].outputs[0].text


def test_completion_n_logprobs_echo_and_stop(client):
    r = client.completions.create(
        model=MODEL,
        prompt=["Hello world", "Paged attention"],
        max_tokens=5,
        n=2,
        temperature=1.0,
        seed=3,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and len(lp.token_logprobs) == 5 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert r.usage.completion_tokens == 20
    echo = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Hello world")
    full = (
        client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full[4:6]
    cut = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    ).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_chat_nonstream_and_stream(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    msg = r.choices[0].message
    assert msg.role == "assistant" and r.usage.completion_tokens == 8
    assert len(r.choices[0].logprobs.content) == 8
    assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed, not one blob
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_async_client_concurrent_requests(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused")
        rs = await asyncio.gather(
            *(
                aclient.completions.create(
                    model=MODEL, prompt=f"Question {i}", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
                )
                for i in range(6)
            )
        )
        await aclient.close()
        return rs

    rs = asyncio.run(main())
    assert all(r.usage.completion_tokens == 4 for r in rs)


def test_models_tokenize_health_version(server, engine):
    base = server.url
    models = httpx.get(f"{base}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 256
    tok = httpx.post(f"{base}/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["tokens"] == engine.get_tokenizer().encode("Hello world") and tok["count"] == len(tok["tokens"])
    assert httpx.post(f"{base}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "Hello world"
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/version").json()["version"] == kvloom.__version__


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 5}, 400, None),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, None),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi " * 300}, 400, "messages"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1000}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, None),
    ],
)
def test_errors_have_openai_shape_and_status(server, engine, path, body, status, param):
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(f"{server.url}{path}", **kwargs)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and "type" in err
    if param:
        assert err["param"] == param
    assert not engine.engine.has_unfinished_requests()


def test_api_key_guards_v1(engine):
    with kvloom.serve(engine, api_key="s3cret") as handle:
        r = httpx.post(f"{handle.base_url}/completions", json={"prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        ok = openai.OpenAI(base_url=handle.base_url, api_key="s3cret").completions.create(
            model=engine.model_name, prompt="hi", max_tokens=2
        )
        assert ok.usage.completion_tokens >= 1
        assert httpx.get(f"{handle.url}/health").status_code == 200  # not under /v1


def test_dropped_stream_aborts_and_frees_blocks(server, engine):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    wait_idle(engine)
    assert_all_blocks_free(engine.engine)


def test_metrics_parse_and_move(server, client):
    def scrape():
        families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
        return {s.name: s.value for f in families for s in f.samples}

    before = scrape()
    client.completions.create(
        model=MODEL, prompt="Count me", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    after = scrape()
    assert after["kvloom:generation_tokens_total"] >= before["kvloom:generation_tokens_total"] + 5
    assert after["kvloom:prompt_tokens_total"] > before["kvloom:prompt_tokens_total"]
    assert after["kvloom:time_to_first_token_seconds_count"] > before.get("kvloom:time_to_first_token_seconds_count", 0)
    for name in (
        "kvloom:num_requests_running",
        "kvloom:num_requests_waiting",
        "kvloom:kv_cache_usage_perc",
        "kvloom:prefix_cache_queries_total",
        "kvloom:prefix_cache_hits_total",
        "kvloom:e2e_request_latency_seconds_count",
        "kvloom:inter_token_latency_seconds_count",
    ):
        assert name in after


def test_serve_an_llm_shares_its_engine(tiny_llama):
    llm = LLM(tiny_llama, num_gpu_blocks_override=64)
    with kvloom.serve(llm) as handle:
        r = openai.OpenAI(base_url=handle.base_url, api_key="x").completions.create(
            model=llm.llm_engine.model_name, prompt="Hi", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
        )
        offline = llm.generate(
            ["Hi"], kvloom.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False
        )
        assert r.choices[0].text == offline[0].outputs[0].text
        assert llm.engine_client.engine is llm.llm_engine
    llm.engine_client.shutdown()

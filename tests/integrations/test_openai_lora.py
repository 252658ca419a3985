"""LoRA through the server: adapters selected by model name, listed in /v1/models, loaded at run time."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

import kvloom
from kvloom import AsyncLLM, SamplingParams

from kvloom_testing import assert_all_blocks_free, assert_no_lora_pins, build_peft_adapter, peft_greedy

pytest.importorskip("peft")

MODEL = "tiny"
PROMPT = [7, 99, 23, 301, 45, 6]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("srv-adapters")
    return {
        "sql": build_peft_adapter(tiny_llama, str(root / "sql"), r=8, seed=21),
        "poet": build_peft_adapter(tiny_llama, str(root / "poet"), r=4, targets=("q_proj", "v_proj"), seed=22),
        "late": build_peft_adapter(tiny_llama, str(root / "late"), r=8, targets=("down_proj",), seed=23),
    }


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = AsyncLLM(model=tiny_llama, enable_lora=True, max_loras=2, num_gpu_blocks_override=128, max_model_len=256)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine, adapter_dirs):
    modules = {"sql": adapter_dirs["sql"], "poet": adapter_dirs["poet"]}
    with kvloom.serve(engine, served_model_name=MODEL, lora_modules=modules, allow_runtime_lora_updating=True) as h:
        yield h


def _complete(client, model):
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    return r


def _direct(engine, prompt, lora, n):
    """Text and token ids of a greedy request made on the engine itself."""
    *_, final = engine.stream(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), lora_request=lora)
    return final.outputs[0].text, final.outputs[0].token_ids


def test_model_name_selects_adapter(server, engine, tiny_llama, adapter_dirs):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    for name in ("sql", "poet", MODEL):
        r = _complete(client, name)
        assert r.model == name
        text, ids = _direct(engine, PROMPT, None if name == MODEL else name, 8)
        assert ids == peft_greedy(tiny_llama, adapter_dirs.get(name), PROMPT, 8)
        assert r.choices[0].text == text
    assert _complete(client, MODEL).choices[0].text != _complete(client, "sql").choices[0].text


def test_models_list_adapters(server):
    cards = {m.id: m for m in openai.OpenAI(base_url=server.base_url, api_key="x").models.list().data}
    assert {MODEL, "sql", "poet"} <= set(cards)
    assert cards["sql"].model_extra["parent"] == MODEL


def test_concurrent_adapters_stream_together(server, engine, tiny_llama, adapter_dirs):

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused")

        async def one(model):
            text = ""
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Hello world"}],
                max_tokens=6,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            return text

        return await asyncio.gather(*(one(m) for m in ["sql", MODEL, "poet", "sql", MODEL]))

    texts = asyncio.run(main())
    ids = engine.apply_chat_template([{"role": "user", "content": "Hello world"}])
    want = {}
    for m in ("sql", "poet", MODEL):
        want[m], tokens = _direct(engine, ids, None if m == MODEL else m, 6)
        assert tokens == peft_greedy(tiny_llama, adapter_dirs.get(m), ids, 6)
    assert texts == [want["sql"], want[MODEL], want["poet"], want["sql"], want[MODEL]]
    assert_all_blocks_free(engine.engine)
    assert_no_lora_pins(engine.engine)


def test_load_and_unload_at_run_time(server, tiny_llama, adapter_dirs):
    url = server.url
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    with pytest.raises(openai.NotFoundError):
        _complete(client, "late")
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": adapter_dirs["late"]})
    assert r.status_code == 200, r.text
    assert _complete(client, "late").model == "late"
    again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": adapter_dirs["late"]})
    assert again.status_code == 400 and again.json()["error"]["type"] == "BadRequestError"
    bad = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"})
    assert bad.status_code == 400 and "is not a directory" in bad.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        _complete(client, "late")


def test_runtime_updating_is_off_by_default(tiny_llama):
    eng = AsyncLLM(model=tiny_llama, enable_lora=True, num_gpu_blocks_override=32, max_model_len=128)
    try:
        with kvloom.serve(eng) as h:
            r = httpx.post(f"{h.url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"})
            assert r.status_code == 404
    finally:
        eng.shutdown()

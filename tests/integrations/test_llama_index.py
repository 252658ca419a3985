"""LlamaIndex adapter on a tiny random model: metadata, complete/chat, real streaming, async, LoRA, errors."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("peft")

from llama_index.core.base.llms.types import ImageBlock  # noqa: E402
from llama_index.core.llms import LLM, ChatMessage, MessageRole  # noqa: E402
from llama_index.core.prompts import PromptTemplate  # noqa: E402

import kvloom  # noqa: E402
from kvloom.integrations.llama_index import Vllm  # noqa: E402

from kvloom_testing import (  # noqa: E402
    add_test_adapters,
    assert_all_blocks_free,
    assert_no_lora_pins,
    greedy,
    peft_greedy,
    record_steps,
    wait_idle,
)

N = 12
ENGINE_ARGS = {
    "num_gpu_blocks_override": 96,
    "max_model_len": 200,
    "enable_lora": True,
    "max_loras": 2,
    "max_lora_rank": 8,
}
PROMPT = "Continuous batching lets"
LONG_PROMPT = "Continuous batching lets new requests join while others decode. " * 40
MESSAGES = [ChatMessage(role=MessageRole.SYSTEM, content="Be brief."), ChatMessage(role=MessageRole.USER, content="Hi")]
TEMPLATE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = kvloom.get_engine(tiny_llama, **ENGINE_ARGS)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def adapters(engine, tiny_llama, tmp_path_factory):
    return add_test_adapters(engine, tiny_llama, tmp_path_factory.mktemp("li-adapters"), seed=41)


@pytest.fixture
def fields(tiny_llama, engine, adapters) -> dict:
    return {"model": tiny_llama, "temperature": 0, "max_new_tokens": N, "ignore_eos": True, "vllm_kwargs": ENGINE_ARGS}


@pytest.fixture
def llm(fields) -> Vllm:
    return Vllm(**fields)


def direct(engine, prompt, lora=None):
    return greedy(engine, prompt, lora, N)


def text_of(engine, prompt, lora=None) -> str:
    return greedy(engine, prompt, lora, N).outputs[0].text


def test_fields_and_defaults_of_llama_index_vllm():
    llm = Vllm()
    assert isinstance(llm, LLM)
    expected = {
        "model": None,  # kvloom's default model rather than facebook/opt-125m
        "temperature": 1.0,
        "tensor_parallel_size": 1,
        "trust_remote_code": False,
        "n": 1,
        "best_of": None,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "top_p": 1.0,
        "top_k": -1,
        "stop": None,
        "ignore_eos": False,
        "max_new_tokens": 512,
        "logprobs": None,
        "dtype": "auto",
        "download_dir": None,
        "vllm_kwargs": {},
        "system_prompt": None,
        "is_chat_model": None,
        "lora": None,
    }
    assert {k: getattr(llm, k) for k in expected} == expected
    assert llm._engine_client is None and Vllm.class_name() == "Vllm"
    with pytest.raises(ValueError, match="api_url"):
        Vllm(api_url="http://localhost:8000")  # an HTTP server is VllmServer's / OpenAILike's job
    with pytest.raises(ValueError, match="top_p"):
        Vllm(top_p=0.0)


def test_metadata(llm, engine, tiny_llama):
    meta = llm.metadata
    assert llm.engine_client is engine
    assert meta.context_window == engine.max_model_len == 200
    assert meta.num_output == N
    assert meta.is_chat_model is True  # the tokenizer has a chat template
    assert meta.model_name == engine.model_name
    assert Vllm(model=tiny_llama, vllm_kwargs=ENGINE_ARGS, is_chat_model=False).metadata.is_chat_model is False


def test_complete_and_chat_match_the_engine(llm, engine):
    want = direct(engine, PROMPT)
    resp = llm.complete(PROMPT)
    assert resp.text == want.outputs[0].text
    n_in = len(want.prompt_token_ids)
    assert resp.additional_kwargs == {
        "finish_reason": "length",
        "stop_reason": None,
        "prompt_tokens": n_in,
        "completion_tokens": N,
        "total_tokens": n_in + N,
    }
    assert resp.raw.request_id.startswith("llamaindex-")
    chat = llm.chat(MESSAGES)
    assert chat.message.role == MessageRole.ASSISTANT
    assert chat.message.content == text_of(engine, engine.apply_chat_template(TEMPLATE))
    assert chat.additional_kwargs["completion_tokens"] == N


def test_messages_to_prompt_replaces_the_template(fields, engine):
    llm = Vllm(
        **fields,
        messages_to_prompt=lambda messages: " | ".join(m.content for m in messages),
        completion_to_prompt=lambda prompt: f"Q: {prompt}",
    )
    assert llm.chat(MESSAGES).message.content == text_of(engine, "Be brief. | Hi")
    assert llm.complete(PROMPT).text == text_of(engine, f"Q: {PROMPT}")
    assert llm.complete(PROMPT, formatted=True).text == text_of(engine, PROMPT)


def test_stream_complete_yields_while_the_request_runs(llm, engine):
    seen_first = threading.Event()
    want = text_of(engine, PROMPT)
    unfinished_at_first = None
    with record_steps(engine.engine, hold=lambda i: seen_first.wait(10) if i >= 2 else None):
        responses = []
        for r in llm.stream_complete(PROMPT):
            if not responses:
                unfinished_at_first = engine.engine.get_num_unfinished_requests()
                seen_first.set()
            responses.append(r)
    assert unfinished_at_first == 1
    assert len(responses) >= 3
    assert "".join(r.delta for r in responses) == responses[-1].text == want
    assert all(b.text.startswith(a.text) for a, b in zip(responses, responses[1:]))  # text so far
    assert responses[-1].additional_kwargs["finish_reason"] == "length"
    assert responses[-1].additional_kwargs["completion_tokens"] == N


def test_stream_chat(llm, engine):
    responses = list(llm.stream_chat(MESSAGES))
    want = text_of(engine, engine.apply_chat_template(TEMPLATE))
    assert len(responses) >= 3 and responses[-1].message.content == want
    assert "".join(r.delta for r in responses) == want


def test_async_forms_match_and_run_concurrently(llm, engine):
    want = text_of(engine, PROMPT)
    chat_want = text_of(engine, engine.apply_chat_template(TEMPLATE))

    async def main():
        done = await asyncio.gather(*(llm.acomplete(PROMPT) for _ in range(3)), llm.achat(MESSAGES))
        completion_stream = await llm.astream_complete(PROMPT)
        completion = [r async for r in completion_stream]
        chat_stream = await llm.astream_chat(MESSAGES)
        chat = [r async for r in chat_stream]
        return done, completion, chat

    with record_steps(engine.engine) as steps:
        done, completion, chat = asyncio.run(main())
    assert [r.text for r in done[:3]] == [want] * 3 and done[3].message.content == chat_want
    assert max(len(s) for s in steps) >= 2  # the gathered calls ran in the engine together
    assert len(completion) >= 3 and completion[-1].text == want
    assert len(chat) >= 3 and chat[-1].message.content == chat_want


def test_predict_through_llama_index(llm, engine):
    # LlamaIndex's own entry point: a chat model gets the template rendered as messages.
    out = llm.predict(PromptTemplate("Say {word}"), word="hi")
    assert out == text_of(engine, engine.apply_chat_template([{"role": "user", "content": "Say hi"}]))


def test_lora_from_the_field_and_the_call(llm, fields, engine, tiny_llama, adapters):
    base, sql = direct(engine, PROMPT), direct(engine, PROMPT, "sql")
    assert sql.outputs[0].token_ids == peft_greedy(tiny_llama, adapters["sql"], sql.prompt_token_ids, N)
    assert sql.outputs[0].token_ids != base.outputs[0].token_ids
    assert llm.complete(PROMPT).text == base.outputs[0].text
    assert llm.complete(PROMPT, lora="sql").text == sql.outputs[0].text
    with_field = Vllm(**fields, lora="sql")
    assert with_field.complete(PROMPT).text == sql.outputs[0].text
    assert with_field.complete(PROMPT, lora=None).text == base.outputs[0].text
    poet = text_of(engine, engine.apply_chat_template(TEMPLATE), "poet")
    assert llm.chat(MESSAGES, lora="poet").message.content == poet
    assert list(llm.stream_chat(MESSAGES, lora="poet"))[-1].message.content == poet

    async def both():
        return await asyncio.gather(llm.acomplete(PROMPT, lora="sql"), llm.acomplete(PROMPT, lora="poet"))

    with record_steps(engine.engine) as steps:
        a, b = asyncio.run(both())
    assert a.text == sql.outputs[0].text and b.text == text_of(engine, PROMPT, "poet")
    assert any(set(step.values()) == {1, 2} for step in steps)
    wait_idle(engine.engine)
    assert_no_lora_pins(engine.engine)


def test_errors_surface_and_the_adapter_stays_usable(llm, engine):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.complete(LONG_PROMPT)
    with pytest.raises(ValueError, match="max_model_len"):
        list(llm.stream_complete(LONG_PROMPT))
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(llm.achat([ChatMessage(role=MessageRole.USER, content=LONG_PROMPT)]))
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        llm.complete(PROMPT, lora="missing")
    with pytest.raises(TypeError, match="unknown generation argument"):
        llm.complete(PROMPT, temprature=0.5)
    image = ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(url="http://127.0.0.1/x.png")])
    with pytest.raises(ValueError, match="text content only"):
        llm.chat([image])
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)
    assert llm.complete(PROMPT).text == text_of(engine, PROMPT)

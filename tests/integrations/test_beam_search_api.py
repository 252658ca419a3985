"""use_beam_search over HTTP (the openai client's extra_body) and in the LangChain wrapper: real beam search
(the beams LLM.beam_search finds), or a 400 / ValueError naming what it cannot honour; never greedy."""

from __future__ import annotations

import asyncio

import openai
import pytest

from kvloom import LLM, BeamSearchParams

from kvloom_testing import assert_all_blocks_free, served_openai_fixtures, wait_idle

MODEL = "tiny"
PROMPT = "Paged attention stores"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    engine = LLM(tiny_llama, num_gpu_blocks_override=128, max_model_len=512)
    yield engine
    engine.shutdown()


server, client = served_openai_fixtures(MODEL)


@pytest.fixture(autouse=True)
def _blocks_free_after(engine):
    yield
    wait_idle(engine.llm_engine)
    assert_all_blocks_free(engine.llm_engine)


def best(engine, prompt, **params) -> list[list[int]]:
    """The output token ids of LLM.beam_search's sequences, best first."""
    (out,) = engine.beam_search([prompt], BeamSearchParams(**params))
    return [s.output_tokens for s in out.sequences]


def test_completions_run_the_beam_search(client, engine):
    extra = {"use_beam_search": True, "length_penalty": 0.5, "ignore_eos": True, "return_token_ids": True}
    r = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=6, extra_body=extra)
    want = best(engine, PROMPT, beam_width=3, max_tokens=6, ignore_eos=True, length_penalty=0.5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.model_extra["token_ids"] for c in r.choices] == want
    tok = engine.get_tokenizer()
    assert [c.text for c in r.choices] == [tok.decode(ids) for ids in want]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 18
    # best_of sets the width (vLLM <= 0.6's rule) and n how many of the best come back.
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, n=2, best_of=4, max_tokens=5, extra_body={**extra, "length_penalty": 1.0}
    )
    assert [c.model_extra["token_ids"] for c in r.choices] == best(
        engine, PROMPT, beam_width=4, max_tokens=5, ignore_eos=True
    )[:2]


def test_chat_and_streaming(client, engine):
    tok = engine.get_tokenizer()
    ids = engine.llm_engine.apply_chat_template(MESSAGES)
    want = [tok.decode(t) for t in best(engine, {"prompt_token_ids": ids}, beam_width=2, max_tokens=5, ignore_eos=True)]
    extra = {"use_beam_search": True, "ignore_eos": True}
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=5, extra_body=extra)
    assert [c.message.content for c in r.choices] == want
    # Streamed, the whole result comes at the end (vLLM streams beam search the same way).
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=5, stream=True, extra_body=extra)
    )
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert [texts[0], texts[1]] == want


@pytest.mark.parametrize(
    "endpoint,fields,name",
    [
        ("completions", {"use_beam_search": True, "temperature": 0.7}, "temperature"),
        ("completions", {"use_beam_search": True, "top_p": 0.5}, "top_p"),
        ("completions", {"use_beam_search": True, "logprobs": 2}, "logprobs"),
        ("completions", {"use_beam_search": True, "stop": ["."]}, "stop"),
        ("completions", {"use_beam_search": True, "n": 11}, "beam_width <= 10"),
        ("completions", {"length_penalty": 0.5}, "length_penalty"),
        ("completions", {"early_stopping": True}, "early_stopping"),
        ("completions", {"use_beam_search": True, "early_stopping": "sometimes"}, "early_stopping"),
        ("chat", {"use_beam_search": True, "logprobs": True}, "logprobs"),
        ("chat", {"use_beam_search": True, "response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"use_beam_search": True, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)
def test_what_beam_search_cannot_honour_is_a_400(client, endpoint, fields, name):
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "completions":
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, extra_body=fields)
        else:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, extra_body=fields)
    assert name in err.value.message
    ok = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 2


def test_langchain_vllm_runs_the_beam_search(engine, server):
    pytest.importorskip("langchain_core")
    from kvloom.integrations.langchain import VLLM

    tok = engine.get_tokenizer()
    want = [tok.decode(t) for t in best(engine, PROMPT, beam_width=3, max_tokens=6, ignore_eos=True)]
    wrapper = VLLM(engine=engine, use_beam_search=True, best_of=3, n=2, max_new_tokens=6, ignore_eos=True)
    result = wrapper.generate([PROMPT, PROMPT])
    assert [[g.text for g in gens] for gens in result.generations] == [want[:2], want[:2]]
    assert result.generations[0][0].generation_info["finish_reason"] == "length"
    assert asyncio.run(wrapper.agenerate([PROMPT])).generations[0][0].text == want[0]
    single = VLLM(engine=engine, use_beam_search=True, best_of=3, max_new_tokens=6, ignore_eos=True)
    assert [c for c in single.stream(PROMPT)] == [want[0]]  # the whole text, once the search ends
    # Through a running server (base_url) the server runs the same search.
    remote = VLLM(
        base_url=server.base_url, model=MODEL, use_beam_search=True, best_of=3, max_new_tokens=6, ignore_eos=True
    )
    assert remote.invoke(PROMPT) == want[0]
    # ChatVLLM searches the chat template's rendering of the conversation.
    from kvloom.integrations.langchain import ChatVLLM

    ids = engine.llm_engine.apply_chat_template(MESSAGES)
    chat_want = tok.decode(best(engine, {"prompt_token_ids": ids}, beam_width=2, max_tokens=5, ignore_eos=True)[0])
    chat = ChatVLLM(engine=engine, use_beam_search=True, best_of=2, max_new_tokens=5, ignore_eos=True)
    assert chat.invoke(MESSAGES[0]["content"]).content == chat_want
    with pytest.raises(ValueError, match="temperature"):
        VLLM(engine=engine, use_beam_search=True, temperature=0.8)
    with pytest.raises(ValueError, match="stop"):
        single.invoke(PROMPT, stop=["."])


def test_llama_index_vllm_runs_the_beam_search(engine):
    pytest.importorskip("llama_index.core")
    from kvloom.integrations.llama_index import Vllm

    tok = engine.get_tokenizer()
    want = tok.decode(best(engine, PROMPT, beam_width=3, max_tokens=6, ignore_eos=True)[0])
    wrapper = Vllm(engine=engine, use_beam_search=True, best_of=3, max_new_tokens=6, ignore_eos=True)
    assert wrapper.complete(PROMPT, formatted=True).text == want
    assert "".join(r.delta for r in wrapper.stream_complete(PROMPT, formatted=True)) == want

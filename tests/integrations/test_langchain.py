"""LangChain adapters on a tiny random model: real base classes, batching, streaming, LoRA, errors, standard suites."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("peft")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.language_models import BaseChatModel, BaseLLM  # noqa: E402
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

import kvloom  # noqa: E402
from kvloom import LoRARequest  # noqa: E402
from kvloom.integrations.langchain import VLLM, ChatVLLM  # noqa: E402

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
# This module's own engine configuration (other test modules use other ones, so other engines).
ENGINE_ARGS = {
    "num_gpu_blocks_override": 128,
    "max_model_len": 256,
    "enable_lora": True,
    "max_loras": 2,
    "max_lora_rank": 8,
}
PROMPT = "The quick brown fox"
LONG_PROMPT = "Paged attention stores keys and values in fixed-size blocks. " * 40


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = kvloom.get_engine(tiny_llama, **ENGINE_ARGS)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def adapters(engine, tiny_llama, tmp_path_factory):
    return add_test_adapters(engine, tiny_llama, tmp_path_factory.mktemp("lc-adapters"), seed=31)


@pytest.fixture
def fields(tiny_llama, engine, adapters):
    """Constructor fields of a greedy wrapper on this module's engine."""
    return {"model": tiny_llama, "temperature": 0, "max_new_tokens": N, "ignore_eos": True, "vllm_kwargs": ENGINE_ARGS}


def direct(engine, prompt, lora=None, n=N):
    return greedy(engine, prompt, lora, n)


def chat_ids(engine, text):
    return engine.apply_chat_template([{"role": "user", "content": text}])


class Tokens(BaseCallbackHandler):
    """Collects the tokens LangChain's callbacks report."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


# ---- construction ------------------------------------------------------------------------------
def test_fields_and_defaults_of_langchain_community_vllm():
    llm = VLLM()
    assert isinstance(llm, BaseLLM) and isinstance(ChatVLLM(), BaseChatModel)
    expected = {
        "model": None,
        "tensor_parallel_size": 1,
        "trust_remote_code": False,
        "n": 1,
        "best_of": None,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "use_beam_search": False,
        "stop": None,
        "ignore_eos": False,
        "max_new_tokens": 512,
        "logprobs": None,
        "dtype": "auto",
        "download_dir": None,
        "vllm_kwargs": {},
        "lora": None,
    }
    assert {k: getattr(llm, k) for k in expected} == expected
    assert llm._llm_type == "vllm"
    assert llm._engine_client is None  # nothing is loaded until the first request
    assert VLLM(max_tokens=7).max_new_tokens == 7  # LangChain's standard name is an alias


def test_bad_fields_fail_at_construction():
    with pytest.raises(ValueError, match="modle"):
        VLLM(modle="x")
    with pytest.raises(ValueError, match="temperature"):
        ChatVLLM(temperature=5.0)
    with pytest.raises(ValueError, match="dtype"):
        VLLM(vllm_kwargs={"dtype": "float32"})


def test_wrappers_share_the_registry_engine(fields, engine):
    llm, chat = VLLM(**fields), ChatVLLM(**fields)
    assert llm.engine_client is engine and chat.engine_client is engine


def test_built_from_an_existing_engine_or_llm(tiny_llama):
    offline = kvloom.LLM(tiny_llama, num_gpu_blocks_override=32, max_model_len=128)
    try:
        llm = VLLM(llm=offline, temperature=0, max_new_tokens=4, ignore_eos=True)
        chat = ChatVLLM(engine=llm.engine_client, temperature=0, max_new_tokens=4, ignore_eos=True)
        assert llm.engine_client is offline.engine_client is chat.engine_client
        assert llm.invoke(PROMPT) == direct(offline.engine_client, PROMPT, n=4).outputs[0].text
        assert chat.invoke("hi").usage_metadata["output_tokens"] == 4
    finally:
        offline.engine_client.shutdown()


# ---- generation --------------------------------------------------------------------------------
def test_invoke_matches_the_engine(fields, engine):
    want = direct(engine, PROMPT)
    result = VLLM(**fields).generate([PROMPT])
    assert result.generations[0][0].text == want.outputs[0].text
    assert result.generations[0][0].generation_info == {"finish_reason": "length", "stop_reason": None}
    prompt_tokens = len(want.prompt_token_ids)
    assert result.llm_output == {
        "token_usage": {"prompt_tokens": prompt_tokens, "completion_tokens": N, "total_tokens": prompt_tokens + N},
        "model_name": engine.model_name,
    }


def test_chat_invoke_uses_the_chat_template(fields, engine):
    messages = [SystemMessage("Be brief."), HumanMessage("Hello")]
    template = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    want = direct(engine, engine.apply_chat_template(template))
    msg = ChatVLLM(**fields).invoke(messages)
    assert isinstance(msg, AIMessage) and msg.content == want.outputs[0].text
    n_in = len(want.prompt_token_ids)
    assert msg.usage_metadata == {"input_tokens": n_in, "output_tokens": N, "total_tokens": n_in + N}
    assert msg.response_metadata["finish_reason"] == "length"
    assert msg.response_metadata["model_name"] == engine.model_name


def test_batch_goes_to_the_engine_together(fields, engine):
    prompts = [f"{PROMPT} {i}" for i in range(6)]
    want = [direct(engine, p).outputs[0].text for p in prompts]
    with record_steps(engine.engine) as steps:
        got = VLLM(**fields).batch(prompts)
    assert got == want
    assert max(len(s) for s in steps) == len(prompts)  # one _generate call, all six in one step
    assert all(rid.startswith("langchain-") for s in steps for rid in s)
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)


def test_async_generate_and_chat_batches_run_concurrently(fields, engine):
    prompts = [f"{PROMPT} {i}" for i in range(4)]
    want = [direct(engine, p).outputs[0].text for p in prompts]
    llm, chat = VLLM(**fields), ChatVLLM(**fields)

    async def main():
        return await llm.abatch(prompts), await llm.ainvoke(prompts[0]), await chat.abatch(prompts)

    with record_steps(engine.engine) as steps:
        texts, single, messages = asyncio.run(main())
        threaded = chat.batch(prompts)  # Runnable.batch: a thread per input, batched in the engine
    assert texts == want and single == want[0]
    chat_want = [direct(engine, chat_ids(engine, p)).outputs[0].text for p in prompts]
    assert [m.content for m in messages] == chat_want == [m.content for m in threaded]
    assert max(len(s) for s in steps) >= 2


# ---- streaming ---------------------------------------------------------------------------------
def test_stream_yields_tokens_while_the_request_runs(fields, engine):
    seen_first = threading.Event()
    # The engine may not run past its third step until the first chunk has arrived here.
    hold = lambda i: seen_first.wait(10) if i >= 2 else None
    handler = Tokens()
    want = direct(engine, PROMPT).outputs[0].text
    unfinished_at_first = None
    with record_steps(engine.engine, hold=hold):
        chunks = []
        for chunk in VLLM(**fields, callbacks=[handler]).stream(PROMPT):
            if not chunks:
                unfinished_at_first = engine.engine.get_num_unfinished_requests()
                seen_first.set()
            chunks.append(chunk)
    assert unfinished_at_first == 1
    assert len(chunks) >= 3 and "".join(chunks) == want
    assert "".join(handler.tokens) == want and len(handler.tokens) >= 3


def test_chat_stream_chunks_usage_and_metadata(fields, engine):
    handler = Tokens()
    want = direct(engine, chat_ids(engine, "Hello"))
    chunks = list(ChatVLLM(**fields).stream("Hello", config={"callbacks": [handler]}))
    assert all(isinstance(c, AIMessageChunk) for c in chunks) and len(chunks) >= 3
    assert [c.chunk_position for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].chunk_position == "last"
    full = sum(chunks[1:], chunks[0])
    assert full.content == want.outputs[0].text == "".join(handler.tokens)
    n_in = len(want.prompt_token_ids)
    assert full.usage_metadata == {"input_tokens": n_in, "output_tokens": N, "total_tokens": n_in + N}
    assert full.response_metadata["finish_reason"] == "length"
    assert full.response_metadata["model_name"] == engine.model_name


def test_async_streams(fields, engine):
    want = direct(engine, PROMPT).outputs[0].text
    chat_want = direct(engine, chat_ids(engine, "Hello")).outputs[0].text

    async def main():
        text = [c async for c in VLLM(**fields).astream(PROMPT)]
        chat = [c async for c in ChatVLLM(**fields).astream("Hello")]
        return text, chat

    text, chat = asyncio.run(main())
    assert len(text) >= 3 and "".join(text) == want
    assert len(chat) >= 3 and "".join(c.content for c in chat) == chat_want
    assert chat[-1].usage_metadata["output_tokens"] == N


def test_streaming_field_streams_invoke_through_callbacks(fields, engine):
    handler = Tokens()
    msg = ChatVLLM(**fields, streaming=True, callbacks=[handler]).invoke("Hello")
    assert len(handler.tokens) >= 3 and "".join(handler.tokens) == msg.content


def test_breaking_off_a_stream_aborts_the_request(fields, engine):
    stream = ChatVLLM(**{**fields, "max_new_tokens": 200}).stream("Hello")
    next(stream)
    stream.close()
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)


# ---- parameters --------------------------------------------------------------------------------
def test_stop_from_the_call_and_from_the_field(fields, engine):
    text = direct(engine, PROMPT).outputs[0].text
    stop = text[len(text) // 2 :][:2]
    assert stop and stop in text
    head = text[: text.index(stop)]
    llm = VLLM(**fields)
    result = llm.generate([PROMPT], stop=[stop]).generations[0][0]
    assert result.text == head
    assert result.generation_info == {"finish_reason": "stop", "stop_reason": stop}
    assert VLLM(**fields, stop=[stop]).invoke(PROMPT) == head
    assert "".join(llm.stream(PROMPT, stop=[stop])) == head


def test_per_call_sampling_arguments(fields, engine):
    llm = VLLM(**fields)
    assert llm.invoke(PROMPT, max_tokens=3) == direct(engine, PROMPT, n=3).outputs[0].text
    assert llm.invoke(PROMPT, max_new_tokens=3) == direct(engine, PROMPT, n=3).outputs[0].text
    with pytest.raises(TypeError, match="unknown generation argument"):
        llm.invoke(PROMPT, max_lenght=3)


def test_n_and_logprobs(fields, engine):
    llm = VLLM(**{**fields, "n": 2, "temperature": 1.0, "logprobs": 2})
    gens = llm.generate([PROMPT], seed=7).generations[0]
    assert len(gens) == 2
    for gen in gens:
        logprobs = gen.generation_info["logprobs"]
        assert len(logprobs) == N
        assert all(p["logprob"] <= 0 and 2 <= len(p["top_logprobs"]) <= 3 for p in logprobs)
    with pytest.raises(ValueError, match="n=1"):
        list(llm.stream(PROMPT))
    chat = ChatVLLM(**fields, logprobs=1)
    assert len(chat.invoke("Hello").response_metadata["logprobs"]) == N
    streamed = list(chat.stream("Hello"))
    assert len(sum(streamed[1:], streamed[0]).response_metadata["logprobs"]) == N


def test_standard_tracing_params(fields):
    params = VLLM(**fields)._get_ls_params(stop=["x"])
    assert params == {
        "ls_provider": "kvloom",
        "ls_model_type": "llm",
        "ls_model_name": fields["model"],
        "ls_temperature": 0,
        "ls_max_tokens": N,
        "ls_stop": ["x"],
    }
    assert ChatVLLM()._get_ls_params()["ls_model_name"] == "smollm2-135m-instruct"


# ---- LoRA --------------------------------------------------------------------------------------
def test_lora_from_the_field_the_call_and_bind(fields, engine, tiny_llama, adapters):
    base, sql = direct(engine, PROMPT), direct(engine, PROMPT, "sql")
    assert sql.outputs[0].token_ids == peft_greedy(tiny_llama, adapters["sql"], sql.prompt_token_ids, N)
    assert sql.outputs[0].token_ids != base.outputs[0].token_ids
    llm = VLLM(**fields)
    with_field = VLLM(**fields, lora="sql")
    assert llm.invoke(PROMPT) == base.outputs[0].text
    assert with_field.invoke(PROMPT) == sql.outputs[0].text
    assert llm.invoke(PROMPT, lora="sql") == sql.outputs[0].text
    assert llm.bind(lora="sql").invoke(PROMPT) == sql.outputs[0].text
    assert with_field.invoke(PROMPT, lora=None) == base.outputs[0].text
    # langchain_community's spelling, with an adapter given by path rather than registered by name
    assert llm.invoke(PROMPT, lora_request=LoRARequest("sql", 1, adapters["sql"])) == sql.outputs[0].text
    poet = direct(engine, chat_ids(engine, "Hello"), "poet")
    assert ChatVLLM(**fields).bind(lora="poet").invoke("Hello").content == poet.outputs[0].text
    assert "".join(c.content for c in ChatVLLM(**fields, lora="poet").stream("Hello")) == poet.outputs[0].text
    wait_idle(engine.engine)
    assert_no_lora_pins(engine.engine)


def test_batch_mixes_adapters_in_one_step(fields, engine):
    llm = VLLM(**fields)
    texts = llm.batch([PROMPT, PROMPT], lora="sql") + llm.batch([PROMPT])
    assert texts == [direct(engine, PROMPT, "sql").outputs[0].text] * 2 + [direct(engine, PROMPT).outputs[0].text]

    async def mixed():
        return await asyncio.gather(llm.ainvoke(PROMPT, lora="sql"), llm.ainvoke(PROMPT, lora="poet"))

    with record_steps(engine.engine) as steps:
        sql_text, poet_text = asyncio.run(mixed())
    assert sql_text == direct(engine, PROMPT, "sql").outputs[0].text
    assert poet_text == direct(engine, PROMPT, "poet").outputs[0].text
    assert any(set(step.values()) == {1, 2} for step in steps)


# ---- errors ------------------------------------------------------------------------------------
def test_errors_surface_and_the_adapter_stays_usable(fields, engine):
    llm, chat = VLLM(**fields), ChatVLLM(**fields)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.invoke(LONG_PROMPT)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.batch([PROMPT, LONG_PROMPT])  # the good prompt's request is aborted
    with pytest.raises(ValueError, match="max_model_len"):
        list(chat.stream(LONG_PROMPT))
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(chat.ainvoke(LONG_PROMPT))
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        llm.invoke(PROMPT, lora="missing")
    with pytest.raises(ValueError, match="text content only"):
        chat.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "data:,"}}])])
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)
    assert llm.invoke(PROMPT) == direct(engine, PROMPT).outputs[0].text


def test_a_request_that_fails_the_engine_step_raises_in_its_caller_only(fields, engine):
    runner = engine.engine.executor.worker.runner
    real = runner.execute_model

    def fail_seed_666(out):
        # A model error caused by one request: every step that computes it raises.
        if any(runner.states.get(s.req_id) and runner.states[s.req_id].params.seed == 666 for s in out.seqs) or any(
            n.sampling_params.seed == 666 for n in out.new_requests
        ):
            raise RuntimeError("injected model failure")
        return real(out)

    chat = ChatVLLM(**fields)
    runner.execute_model = fail_seed_666
    try:

        async def both():
            good = asyncio.ensure_future(chat.ainvoke("Hello"))
            with pytest.raises(RuntimeError, match="injected model failure"):
                await chat.ainvoke("Hello", seed=666)
            return await good

        assert asyncio.run(both()).content == direct(engine, chat_ids(engine, "Hello")).outputs[0].text
        with pytest.raises(RuntimeError, match="injected model failure"):
            VLLM(**fields).invoke(PROMPT, seed=666)
    finally:
        runner.execute_model = real
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)
    assert chat.invoke("Hello").content == direct(engine, chat_ids(engine, "Hello")).outputs[0].text


# ---- langchain-tests standard suites -----------------------------------------------------------
class _TinyModel:
    """Points the standard suites at this module's tiny model and engine."""

    model_dir: str = ""

    @pytest.fixture(autouse=True)
    def _tiny(self, tiny_llama, engine):
        type(self).model_dir = tiny_llama

    @property
    def chat_model_class(self) -> type[ChatVLLM]:
        return ChatVLLM

    @property
    def chat_model_params(self) -> dict:
        # ignore_eos: a random model may end at once, and the suites want some text back.
        return {"model": self.model_dir, "max_new_tokens": N, "ignore_eos": True, "vllm_kwargs": ENGINE_ARGS}


class TestChatVLLMStandardUnit(ChatModelUnitTests):
    # test_serdes skips itself: langchain-core's load() revives only classes on its own allowlist, so a
    # third-party model cannot round-trip and ChatVLLM keeps is_lc_serializable() False.
    @property
    def chat_model_class(self) -> type[ChatVLLM]:
        return ChatVLLM

    @property
    def chat_model_params(self) -> dict:
        # Unit tests never generate, so no engine is made: a stable name keeps the serialization snapshot stable.
        return {"model": "kvloom-unit-test-model", "vllm_kwargs": {"max_model_len": 256}}

    @property
    def standard_chat_model_params(self) -> dict:
        # All of the suite's standard params but api_key: an in-process model has no server to send a
        # key to, and ChatVLLM refuses an api_key without base_url rather than ignore it. The
        # remote form (base_url + api_key) is tested in test_remote_adapters.py.
        params = super().standard_chat_model_params
        params.pop("api_key")
        return params

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        # Nothing is read from the environment: an in-process model needs no key or address.
        return {}, {}, {}


@pytest.mark.slow
class TestChatVLLMStandardIntegration(ChatModelIntegrationTests):
    """langchain-tests' integration suite on the real default model, tool calling and structured output on."""

    @property
    def chat_model_class(self) -> type[ChatVLLM]:
        return ChatVLLM

    @property
    def chat_model_params(self) -> dict:
        return {"temperature": 0, "max_new_tokens": 256, "vllm_kwargs": {"max_model_len": 2048}}

    @property
    def has_tool_choice(self) -> bool:
        return True  # required and named choices are enforced by constrained decoding

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False  # text-only models

    @property
    def supports_model_override(self) -> bool:
        return False  # one engine serves one model; adapters are chosen with lora=

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @pytest.mark.xfail(
        reason="needs the model to choose a tool by itself (tool_choice auto): the 135M default model answers in "
        "text instead; auto is tested with a model that opens calls itself in test_langchain_tools.py"
    )
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

"""Vllm as a LlamaIndex FunctionCallingLLM: chat_with_tools, tool calls, structured_predict, FunctionAgent."""

import asyncio
from typing import Literal

import jsonschema
import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, ToolCallBlock  # noqa: E402
from llama_index.core.prompts import PromptTemplate  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

import kvloom  # noqa: E402
from kvloom.integrations.llama_index import Vllm  # noqa: E402

from kvloom_testing import assert_all_blocks_free, wait_idle  # noqa: E402

ENGINE_ARGS = {"num_gpu_blocks_override": 512, "max_model_len": 2048}


def get_weather(city: Literal["Paris", "Rome"], days: int = Field(ge=1, le=7)) -> str:
    """Weather forecast for a city."""
    return f"sunny in {city} for {days} days"


def get_time(city: Literal["Paris", "Rome"]) -> str:
    """Local time in a city."""
    return f"noon in {city}"


TOOLS = [FunctionTool.from_defaults(get_weather), FunctionTool.from_defaults(get_time)]
SCHEMAS = {t.metadata.name: t.metadata.get_parameters_dict() for t in TOOLS}


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def engine(tiny_tools):
    eng = kvloom.get_engine(tiny_tools, **ENGINE_ARGS)
    yield eng
    eng.shutdown()


@pytest.fixture
def llm(tiny_tools, engine):
    return Vllm(model=tiny_tools, temperature=0, max_new_tokens=300, vllm_kwargs=ENGINE_ARGS)


@pytest.fixture(autouse=True)
def _blocks_free_after(engine):
    yield
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)


def assert_valid(selections, names=None):
    assert selections
    for s in selections:
        assert s.tool_id.startswith("call_")
        jsonschema.validate(s.tool_kwargs, SCHEMAS[s.tool_name])
    if names is not None:
        assert [s.tool_name for s in selections] == names


def test_is_a_function_calling_model(llm):
    assert llm.metadata.is_function_calling_model


def test_required_and_named_tool_calls(llm):
    response = llm.chat_with_tools(TOOLS, user_msg="Weather in Paris?", tool_required=True)
    assert response.additional_kwargs["finish_reason"] == "tool_calls"
    assert all(isinstance(b, ToolCallBlock) for b in response.message.blocks)
    assert_valid(llm.get_tool_calls_from_response(response))
    named = llm.chat_with_tools(TOOLS, user_msg="Time in Rome?", tool_choice="get_time")
    assert_valid(llm.get_tool_calls_from_response(named), ["get_time"])
    streamed = list(llm.stream_chat_with_tools(TOOLS, user_msg="Weather in Paris?", tool_required=True))
    assert [s.tool_kwargs for s in llm.get_tool_calls_from_response(streamed[-1])] == [
        s.tool_kwargs for s in llm.get_tool_calls_from_response(response)
    ]
    async_response = asyncio.run(llm.achat_with_tools(TOOLS, user_msg="Weather in Paris?", tool_required=True))
    assert_valid(llm.get_tool_calls_from_response(async_response))


def test_auto_reads_a_call_the_model_opens_itself(llm, engine):
    bias = {engine.get_tokenizer().convert_tokens_to_ids("<tool_call>"): 100}
    response = llm.chat_with_tools(TOOLS, user_msg="Weather in Paris?", logit_bias=bias)
    assert_valid(llm.get_tool_calls_from_response(response))
    plain = llm.chat_with_tools(TOOLS, user_msg="Weather in Paris?")
    assert plain.message.content and llm.get_tool_calls_from_response(plain, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="tool call"):
        llm.get_tool_calls_from_response(plain)


def test_predict_and_call_runs_the_tool_and_history_round_trips(llm):
    result = llm.predict_and_call(TOOLS[:1], user_msg="Weather?", tool_required=True)
    assert result.response.startswith("sunny in ")
    call = llm.chat_with_tools(TOOLS, user_msg="Weather?", tool_required=True)
    selection = llm.get_tool_calls_from_response(call)[0]
    history = [
        ChatMessage(role="user", content="Weather?"),
        call.message,
        ChatMessage(role="tool", content="sunny", additional_kwargs={"tool_call_id": selection.tool_id}),
    ]
    answer = llm.chat(history, tools=[t.metadata.to_openai_tool() for t in TOOLS])
    assert answer.message.role == "assistant"


def test_structured_predict_is_constrained(llm):
    person = llm.structured_predict(Person, PromptTemplate("Describe {who}."), who="someone")
    assert isinstance(person, Person)


@pytest.mark.slow
def test_function_agent_calls_a_tool_on_the_default_model():
    from llama_index.core.agent.workflow import FunctionAgent

    calls = []

    def weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"Sunny, 22 degrees Celsius in {city}"

    llm = Vllm(temperature=0, max_new_tokens=64, vllm_kwargs={"max_model_len": 2048})
    # The 135M default model rarely chooses a tool by itself: the first turn requires this one.
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(weather)], llm=llm, initial_tool_choice="weather")

    async def run():
        return await agent.run("What's the weather like in Paris right now?")

    answer = asyncio.run(run())
    assert calls == ["Paris"]
    assert "22 degrees" in str(answer)

"""ChatVLLM tool calling and structured output: bind_tools, with_structured_output, timeouts, create_agent.

Most tests use a tiny random model whose tokenizer has `<tool_call>` as one token (so logit_bias can
make it open a call by itself); the agent test uses the real default model.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import jsonschema
import pytest

pytest.importorskip("langchain_core")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from typing_extensions import TypedDict  # noqa: E402

import kvloom  # noqa: E402
from kvloom.chat_utils import render_chat  # noqa: E402
from kvloom.integrations.langchain import ChatVLLM  # noqa: E402

from kvloom_testing import assert_all_blocks_free, wait_idle  # noqa: E402

ENGINE_ARGS = {"num_gpu_blocks_override": 512, "max_model_len": 2048}


@tool
def get_weather(city: Literal["Paris", "Rome"], days: int = Field(ge=1, le=7)) -> str:
    """Weather forecast for a city."""
    return f"sunny in {city} for {days} days"


@tool
def get_time(city: Literal["Paris", "Rome"]) -> str:
    """Local time in a city."""
    return f"noon in {city}"


SCHEMAS = {t.name: t.tool_call_schema.model_json_schema() for t in (get_weather, get_time)}


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user"]


class PersonDict(TypedDict):
    """A person (bounded fields: a random model must finish the object)."""

    name: Literal["Ann", "Bob"]
    member: bool


@pytest.fixture(scope="module")
def engine(tiny_tools):
    eng = kvloom.get_engine(tiny_tools, **ENGINE_ARGS)
    yield eng
    eng.shutdown()


@pytest.fixture
def chat(tiny_tools, engine):
    return ChatVLLM(model=tiny_tools, temperature=0, max_new_tokens=300, vllm_kwargs=ENGINE_ARGS)


@pytest.fixture(autouse=True)
def _blocks_free_after(engine):
    yield
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)


def assert_valid(calls, names=None):
    assert calls
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "tool_call"
        jsonschema.validate(call["args"], SCHEMAS[call["name"]])
    if names is not None:
        assert [c["name"] for c in calls] == names


def gather(chunks):
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full


def test_forced_calls_invoke_and_stream_agree(chat):
    model = chat.bind_tools([get_weather, get_time], tool_choice="any")
    message = model.invoke("What is the weather in Paris?")
    assert isinstance(message, AIMessage) and message.response_metadata["finish_reason"] == "tool_calls"
    assert_valid(message.tool_calls)
    streamed = gather(list(model.stream("What is the weather in Paris?")))
    assert streamed.tool_call_chunks and streamed.tool_call_chunks[0]["id"].startswith("call_")
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in message.tool_calls]
    assert streamed.response_metadata["finish_reason"] == "tool_calls"
    one = chat.bind_tools([get_weather, get_time], tool_choice="get_time", parallel_tool_calls=False)
    assert_valid(one.invoke("What time is it in Rome?").tool_calls, ["get_time"])


def test_auto_reads_a_call_the_model_opens_itself(chat, engine):
    call_token = engine.get_tokenizer().convert_tokens_to_ids("<tool_call>")
    model = chat.bind_tools([get_weather, get_time], parallel_tool_calls=False)
    message = model.invoke("What is the weather in Paris?", logit_bias={call_token: 100})
    assert_valid(message.tool_calls)
    assert len(message.tool_calls) == 1 and not message.content
    async_chunks = asyncio.run(_collect(model.astream("Weather in Paris?", logit_bias={call_token: 100})))
    assert_valid(gather(async_chunks).tool_calls)
    plain = model.invoke("What is the weather in Paris?")
    assert plain.content and not plain.tool_calls


async def _collect(stream):
    return [chunk async for chunk in stream]


def test_tool_results_go_back_into_the_prompt(chat, engine):
    model = chat.bind_tools([get_weather], tool_choice="any")
    question = HumanMessage("What is the weather in Rome?")
    call_message = model.invoke([question])
    result = get_weather.invoke(call_message.tool_calls[0])
    assert isinstance(result, ToolMessage)
    answer = chat.bind_tools([get_weather]).invoke([question, call_message, result])
    assert isinstance(answer, AIMessage)
    from kvloom.integrations.langchain import _template_message

    prompt = render_chat(engine, [_template_message(m) for m in (question, call_message, result)], tools=[])
    text = engine.get_tokenizer().decode(prompt.prompt_token_ids)
    assert result.content in text and call_message.tool_calls[0]["id"] not in text and "get_weather" in text


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_methods(chat, method):
    if method == "json_mode":  # any JSON object, which may not be a Person: include_raw says why not
        raw = chat.with_structured_output(Person, method=method, include_raw=True).invoke("Describe a person.")
        assert isinstance(raw["raw"], AIMessage) and isinstance(json.loads(raw["raw"].content), dict)
        assert isinstance(raw["parsed"], Person) or raw["parsing_error"] is not None
        return
    person = chat.with_structured_output(Person, method=method).invoke("Describe a person.", max_tokens=300)
    assert isinstance(person, Person)
    as_dict = chat.with_structured_output(PersonDict, method=method).invoke("Describe a person.")
    assert set(as_dict) == {"name", "member"} and isinstance(as_dict["member"], bool)
    schema = Person.model_json_schema()
    raw = chat.with_structured_output(schema, method=method, include_raw=True).invoke("Describe a person.")
    assert raw["parsing_error"] is None and isinstance(raw["raw"], AIMessage)
    jsonschema.validate(raw["parsed"], schema)


def test_structured_output_streams_parsed_objects(chat):
    chunks = list(chat.with_structured_output(Person).stream("Describe a person."))
    assert chunks and isinstance(chunks[-1], Person)


def test_timeout_aborts_the_request(tiny_tools, engine):
    slow = ChatVLLM(model=tiny_tools, max_new_tokens=1500, ignore_eos=True, timeout=0.3, vllm_kwargs=ENGINE_ARGS)
    with pytest.raises(TimeoutError):
        slow.invoke("Write forever")
    with pytest.raises(TimeoutError):
        list(slow.stream("Write forever"))
    with pytest.raises(TimeoutError):
        asyncio.run(slow.ainvoke("Write forever"))
    with pytest.raises(TimeoutError):
        asyncio.run(_collect(slow.astream("Write forever")))


def test_standard_remote_style_fields_are_honoured(tiny_tools, engine):
    chat = ChatVLLM(model=tiny_tools, max_tokens=3, timeout=30, max_retries=1, vllm_kwargs=ENGINE_ARGS)
    assert chat.max_new_tokens == 3 and chat.timeout == 30 and chat.max_retries == 1
    assert chat.invoke("Hi", ignore_eos=True).usage_metadata["output_tokens"] == 3


def test_bad_tool_arguments_raise_clearly(chat):
    with pytest.raises(ValueError, match="neither a bound tool"):
        chat.bind_tools([get_weather], tool_choice="get_time")
    with pytest.raises(ValueError, match="tool_choice"):
        chat.bind_tools([get_weather], tool_choice="any").invoke("x", response_format={"type": "json_object"})


@pytest.mark.slow
def test_create_agent_calls_a_tool_on_the_default_model():
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    calls = []

    @tool
    def weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"Sunny, 22 degrees Celsius in {city}"

    @wrap_model_call
    def first_turn_calls_a_tool(request, handler):
        # The 135M default model rarely chooses a tool by itself: require one until a tool has answered.
        if not any(m.type == "tool" for m in request.messages):
            request = request.override(tool_choice="any")
        return handler(request)

    chat = ChatVLLM(temperature=0, max_new_tokens=64, vllm_kwargs={"max_model_len": 2048})
    agent = create_agent(chat, tools=[weather], middleware=[first_turn_calls_a_tool])
    out = agent.invoke({"messages": [{"role": "user", "content": "What's the weather like in Paris right now?"}]})
    assert calls == ["Paris"]
    kinds = [m.type for m in out["messages"]]
    assert kinds == ["human", "ai", "tool", "ai"]
    assert "22 degrees" in out["messages"][-1].content


def pick_color(color: Literal["red", "blue"]) -> str:
    """Pick a color."""
    return color


class Rate(BaseModel):
    """Rate something from 1 to 5."""

    stars: int = Field(ge=1, le=5)


def test_functions_pydantic_classes_and_schemas_as_tools(chat):
    for spec, name in ((pick_color, "pick_color"), (Rate, "Rate"), (Person.model_json_schema(), "Person")):
        message = chat.bind_tools([spec], tool_choice="any").invoke("Go.")
        assert message.tool_calls[0]["name"] == name
    assert message.tool_calls[0]["args"]["role"] in ("admin", "user")

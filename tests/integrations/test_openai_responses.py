"""/v1/responses (OpenAI's Responses API) with the official openai client and the OpenAI Agents SDK.

The tiny random model writes noise, so the tests pin down what does not depend on its taste:
tool_choice="required" or a named function (the grammar forces a valid call), text.format (the
grammar forces the JSON), and prompt sizes (a Responses conversation renders to the same tokens as
the chat messages it stands for, which /tokenize counts).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from kvloom import AsyncLLM
from kvloom.integrations.openai.server import start_server
from kvloom.integrations.openai.serving_responses import ResponseStore, StoredResponse

from kvloom_testing import assert_all_blocks_free, served_openai_fixtures, wait_idle

MODEL = "tiny-responses"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
TIME = {
    "type": "function",
    "name": "get_time",
    "description": "Local time of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}}, "required": ["city"]},
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
}


@pytest.fixture(scope="module")
def engine(tiny_tools):
    eng = AsyncLLM(model=tiny_tools, num_gpu_blocks_override=512, max_model_len=2048)
    yield eng
    eng.shutdown()


server, client = served_openai_fixtures(MODEL)


@pytest.fixture(autouse=True)
def _blocks_free_after(engine):
    yield
    wait_idle(engine.engine)
    assert_all_blocks_free(engine.engine)


def prompt_tokens(server, messages: list[dict], tools: list[dict] | None = None) -> int:
    """How many tokens /tokenize renders chat messages (and chat-shaped tools) to."""
    body = {"model": MODEL, "messages": messages}
    if tools:
        body["tools"] = [{"type": "function", "function": {k: t[k] for k in ("name", "parameters")}} for t in tools]
    r = httpx.post(f"{server.url}/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def raw_events(server, **body) -> list[dict]:
    """The SSE events of a streamed response, with their `event:` names checked against `type`."""
    events = []
    with httpx.stream("POST", f"{server.base_url}/responses", json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                assert event["type"] == name
                events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_text_response_with_instructions_streamed_and_not(client, server):
    kwargs = dict(model=MODEL, input="Hello there", instructions="Answer briefly.", max_output_tokens=6, temperature=0)
    r = client.responses.create(**kwargs)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.status == "incomplete"  # the token limit cut it
    assert message.content[0].type == "output_text" and r.output_text == message.content[0].text
    assert r.usage.output_tokens == 6 and r.usage.total_tokens == r.usage.input_tokens + 6
    assert r.usage.input_tokens_details.cached_tokens >= 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    # The instructions are the system message.
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there"}]
    assert r.usage.input_tokens == prompt_tokens(server, chat)
    assert r.instructions == "Answer briefly." and r.store is True and r.tools == [] and r.tool_choice == "auto"

    events = raw_events(server, **{k: v for k, v in kwargs.items() if k != "model"})
    types = [e["type"] for e in events]
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == r.output_text == events[-4]["text"]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == text


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_call_streamed_and_not(client, parallel):
    kwargs = dict(model=MODEL, input="Weather in Paris?", tools=TOOLS, tool_choice="required", max_output_tokens=300)
    kwargs.update(temperature=0, parallel_tool_calls=parallel)
    r = client.responses.create(**kwargs)
    assert r.status == "completed" and r.output
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and all(item.type == "function_call" for item in r.output)
    for call in calls:
        assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    if not parallel:
        assert len(calls) == 1
    assert r.tools[0].name == "get_weather" and r.tool_choice == "required"

    streamed = client.responses.create(stream=True, **kwargs)
    events = list(streamed)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    final = events[-1]
    assert final.type == "response.completed"
    assert [(e.name, e.arguments) for e in done] == [(c.name, c.arguments) for c in calls]
    for e in done:
        pieces = [
            d.delta for d in events if d.type == "response.function_call_arguments.delta" and d.item_id == e.item_id
        ]
        assert "".join(pieces) == e.arguments
    assert [(c.name, c.arguments) for c in final.response.output] == [(c.name, c.arguments) for c in calls]


def test_auto_tool_choice_reads_a_call_the_model_opens_itself(client, engine):
    # logit_bias (a vLLM extra field) on <tool_call> makes the model open a call by its own sampling.
    call_token = str(engine.get_tokenizer().convert_tokens_to_ids("<tool_call>"))
    kwargs = dict(model=MODEL, input="Weather in Paris?", tools=TOOLS, max_output_tokens=300, temperature=0)
    kwargs.update(parallel_tool_calls=False, extra_body={"logit_bias": {call_token: 100}})
    r = client.responses.create(**kwargs)
    # Only the call: the whitespace around it makes no message item.
    assert [item.type for item in r.output] == ["function_call"] and r.status == "completed"
    jsonschema.validate(json.loads(r.output[0].arguments), SCHEMAS[r.output[0].name])
    events = list(client.responses.create(stream=True, **kwargs))
    assert [e.type for e in events if e.type.startswith("response.output_item")] == [
        "response.output_item.added",
        "response.output_item.done",
    ]
    assert events[-1].response.output[0].arguments == r.output[0].arguments


def test_a_client_that_disconnects_mid_stream_aborts_its_request(server, engine, caplog):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 1900, "ignore_eos": True, "stream": True}
    with caplog.at_level(logging.INFO, logger="kvloom.integrations.openai"):
        with httpx.stream("POST", f"{server.base_url}/responses", json=body) as r:
            for line in r.iter_lines():
                if line == "event: response.output_text.delta":
                    break
        wait_idle(engine.engine)
    assert "disconnected; its requests were aborted" in caplog.text  # the fixture then finds every block free


def test_named_tool_choice_and_tool_result_round_trip(client, server):
    r = client.responses.create(
        model=MODEL,
        input="Time?",
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_time"},
        max_output_tokens=200,
        temperature=0,
    )
    (call,) = r.output
    assert call.name == "get_time" and r.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_time"])
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "It is noon in Oslo"}
    # Chained through the store, and sent whole as the Agents SDK does: the same prompt.
    chained = client.responses.create(model=MODEL, previous_response_id=r.id, input=[result], max_output_tokens=3)
    explicit = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": "Time?"}, call.model_dump(exclude_none=True), result],
        max_output_tokens=3,
    )
    chat = [
        {"role": "user", "content": "Time?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": "get_time", "arguments": call.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "It is noon in Oslo"},
    ]
    assert chained.usage.input_tokens == explicit.usage.input_tokens == prompt_tokens(server, chat)
    assert chained.previous_response_id == r.id


def test_previous_response_chain_store_false_get_and_delete(client, server):
    first = client.responses.create(model=MODEL, input="Hi", instructions="Be kind.", max_output_tokens=4)
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input="More", max_output_tokens=4)
    # The earlier input and output come before the new input; the earlier instructions do not.
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "More"},
    ]
    assert second.usage.input_tokens == prompt_tokens(server, chat)
    third = client.responses.create(model=MODEL, previous_response_id=second.id, input="Again", max_output_tokens=2)
    chat += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Again"}]
    assert third.usage.input_tokens == prompt_tokens(server, chat)

    got = client.responses.retrieve(first.id)
    assert got.model_dump() == first.model_dump()
    unstored = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, previous_response_id=unstored.id, input="x", max_output_tokens=2)
    assert err.value.body["param"] == "previous_response_id" and unstored.id in err.value.message

    deleted = httpx.delete(f"{server.base_url}/responses/{first.id}")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": first.id,
        "object": "response.deleted",
        "deleted": True,
    }
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    # A streamed response is stored once it completes.
    events = list(client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, stream=True))
    assert client.responses.retrieve(events[-1].response.id).output_text == events[-1].response.output_text
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.cancel(second.id)


def test_store_is_bounded_lru(engine):
    with start_server(engine, served_model_name=MODEL, max_stored_responses=2) as handle:
        c = openai.OpenAI(base_url=handle.base_url, api_key="unused")
        a, b = (c.responses.create(model=MODEL, input=x, max_output_tokens=1) for x in ("a", "b"))
        c.responses.retrieve(a.id)  # a is now the most recently used
        c.responses.create(model=MODEL, input="c", max_output_tokens=1)
        assert c.responses.retrieve(a.id).id == a.id
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(b.id)
    with pytest.raises(ValueError, match="max_stored_responses"):
        ResponseStore(-1)
    nothing_kept = ResponseStore(0)
    nothing_kept.put("resp_x", StoredResponse({}, []))
    assert len(nothing_kept) == 0 and nothing_kept.get("resp_x") is None


class Answer(BaseModel):
    ok: bool
    n: int = Field(ge=0, le=99)


def test_text_format_json_schema_and_json_object(client):
    r = client.responses.create(
        model=MODEL,
        input="Answer as JSON",
        text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}},
        max_output_tokens=300,
        temperature=0,
    )
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), SCHEMA)
    kwargs = dict(model=MODEL, input="Answer", text_format=Answer, max_output_tokens=300, temperature=0)
    parsed = client.responses.parse(**kwargs)
    assert isinstance(parsed.output_parsed, Answer)
    # The client's stream helper assembles the same response (it wants status completed).
    with client.responses.stream(**kwargs) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == final.output_text == parsed.output_text and final.output_parsed == parsed.output_parsed
    r = client.responses.create(
        model=MODEL, input="JSON please", text={"format": {"type": "json_object"}}, max_output_tokens=300, temperature=0
    )
    assert r.output_text.startswith("{") and (r.status == "incomplete" or isinstance(json.loads(r.output_text), dict))


def test_logprobs_are_included_when_asked(client):
    r = client.responses.create(
        model=MODEL,
        input="Hi",
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        max_output_tokens=4,
        temperature=0,
    )
    logprobs = r.output[0].content[0].logprobs
    assert len(logprobs) == 4 and "".join(lp.token for lp in logprobs) == r.output_text
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in logprobs)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"include": ["file_search_call.results"]}, "file_search_call.results"),
        ({"truncation": "auto"}, "truncation"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"tools": [{"type": "web_search"}]}, "only function tools"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "flat"),
        ({"tools": TOOLS, "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "nope"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": TOOLS, "tool_choice": "required", "text": {"format": {"type": "json_object"}}}, "tool_choice"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "reasoning"),
        ({"input": [{"role": "tool", "content": "x"}]}, "role"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]}, "JSON object"),
        ({"input": []}, "empty"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "unsupported field(s): prompt"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stream_options": {"include_obfuscation": True}}, "include_obfuscation"),
        ({"extra_body": {"n": 2}}, "unsupported field(s): n"),
        ({"extra_body": {"response_format": {"type": "json_object"}}}, "text.format"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
        ({"max_output_tokens": 5000}, "maximum context length"),
    ],
)
def test_bad_requests_are_400_naming_the_problem(client, kwargs, fragment):
    kwargs = {"model": MODEL, "input": "Hi", "max_output_tokens": 3, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(**kwargs)
    assert fragment in err.value.message
    ok = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    assert ok.status == "incomplete" and ok.usage.output_tokens == 2


def test_unknown_model_and_response_ids_are_404(client, server):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="Hi")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_missing")
    assert httpx.delete(f"{server.base_url}/responses/resp_missing").status_code == 404


def test_agents_sdk_default_responses_model_runs_a_function_tool(server):
    agents = pytest.importorskip("agents")
    from agents.models.openai_responses import OpenAIResponsesModel

    calls = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"Sunny, 22 degrees Celsius in {city}"

    def agent(**kwargs):
        # The tiny model does not choose tools by itself: the first turn requires one (the SDK
        # resets tool_choice to auto once a tool has run).
        settings = agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=150)
        return agents.Agent(
            name="weather",
            instructions="You answer questions about the weather.",
            tools=[get_weather],
            model=MODEL,
            model_settings=settings,
            **kwargs,
        )

    async def run():
        # The SDK's default provider, pointed at the server: its default model is the Responses API's.
        provider = agents.OpenAIProvider(openai_client=openai.AsyncOpenAI(base_url=server.base_url, api_key="unused"))
        assert isinstance(provider.get_model(MODEL), OpenAIResponsesModel)
        config = agents.RunConfig(model_provider=provider, tracing_disabled=True)
        ask = "What's the weather like in Paris right now?"
        stopped = await agents.Runner.run(agent(tool_use_behavior="stop_on_first_tool"), ask, run_config=config)
        streamed = agents.Runner.run_streamed(agent(tool_use_behavior="stop_on_first_tool"), ask, run_config=config)
        kinds = {event.type async for event in streamed.stream_events()}
        # The default behaviour: the tool's output goes back as a function_call_output item, and
        # the model answers (noise, from this model) in a second response.
        answered = await agents.Runner.run(agent(), ask, run_config=config, max_turns=3)
        return stopped, streamed, kinds, answered

    stopped, streamed, kinds, answered = asyncio.run(run())
    assert calls[:2] == [calls[0]] * 2 and calls[0] in ("Paris", "Rome")
    assert stopped.final_output == streamed.final_output == f"Sunny, 22 degrees Celsius in {calls[0]}"
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    assert len(calls) == 3 and len(answered.raw_responses) == 2 and isinstance(answered.final_output, str)
    second_turn = answered.raw_responses[1]
    assert [item.type for item in second_turn.output] == ["message"]

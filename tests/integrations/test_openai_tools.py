"""Tool calling and structured outputs through the live server, with the official openai client.

The tiny random model has `<tool_call>` as one token; `logit_bias` on it makes the model open a call
by its own sampling in tool_choice="auto", and the structural tag then constrains the call.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

import kvloom
from kvloom import AsyncLLM

from kvloom_testing import assert_all_blocks_free, served_openai_fixtures, wait_idle

MODEL = "tiny-tools"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


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


@pytest.fixture(scope="module")
def call_token(engine) -> str:
    return str(engine.get_tokenizer().convert_tokens_to_ids("<tool_call>"))


def check_calls(calls, expect_names=None):
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    if expect_names is not None:
        assert [c.function.name for c in calls] == expect_names


def streamed(client, **kwargs):
    """The tool calls, content and finish reason assembled from a stream as an OpenAI client would."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.id is not None:
                assert d.index not in calls and d.type == "function" and d.function.name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], content, finish


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_validate_streamed_and_not(client, parallel):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300)
    kwargs.update(temperature=0.9, seed=4, parallel_tool_calls=parallel)
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls)
    if not parallel:
        assert len(choice.message.tool_calls) == 1
    calls, content, finish = streamed(client, **kwargs)
    assert finish == "tool_calls" and not content.strip()
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]


def test_named_function_is_called(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0)
    r = client.chat.completions.create(**kwargs)
    check_calls(r.choices[0].message.tool_calls, ["get_time"])
    assert r.choices[0].finish_reason == "stop"  # OpenAI reports a forced function as a normal stop
    calls, _, _ = streamed(client, **kwargs)
    assert (
        calls[0]["name"] == "get_time"
        and calls[0]["arguments"] == r.choices[0].message.tool_calls[0].function.arguments
    )


def test_auto_parses_a_call_the_model_opens_itself(client, call_token):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, temperature=0)
    biased = {**kwargs, "parallel_tool_calls": False, "logit_bias": {call_token: 100}}
    r = client.chat.completions.create(**biased)
    assert r.choices[0].finish_reason == "tool_calls"
    check_calls(r.choices[0].message.tool_calls)
    assert len(r.choices[0].message.tool_calls) == 1 and not r.choices[0].message.content
    calls, _, finish = streamed(client, **biased)
    assert finish == "tool_calls" and len(calls) == 1
    # Without the bias this model writes text: it comes back as content, with no calls.
    plain = client.chat.completions.create(**kwargs)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_tool_result_round_trip_reaches_the_prompt(client, server):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200
    )
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        first.choices[0].message.model_dump(),  # as clients echo it: refusal, audio, annotations null
        {"role": "tool", "tool_call_id": call.id, "content": "sunny and 22 degrees"},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length")
    rendered = httpx.post(
        server.base_url.removesuffix("/v1") + "/tokenize", json={"model": MODEL, "messages": history, "tools": TOOLS}
    )
    assert rendered.status_code == 200
    text = client_tokenizer_decode(server, rendered.json()["tokens"])
    assert "sunny and 22 degrees" in text and call.function.name in text and "<tools>" in text


def client_tokenizer_decode(server, ids) -> str:
    r = httpx.post(server.base_url.removesuffix("/v1") + "/detokenize", json={"model": MODEL, "tokens": ids})
    return r.json()["prompt"]


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
}


@pytest.mark.parametrize(
    "extra,check",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": SCHEMA, "strict": True},
                }
            },
            lambda t: jsonschema.validate(json.loads(t), SCHEMA),
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
            lambda t: jsonschema.validate(json.loads(t), SCHEMA),
        ),
        ({"extra_body": {"guided_json": SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ({"extra_body": {"guided_regex": "[a-c]{4}"}}, lambda t: re.fullmatch("[a-c]{4}", t)),
        ({"extra_body": {"guided_choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
        ({"extra_body": {"guided_grammar": 'root ::= "v" [0-9]'}}, lambda t: re.fullmatch("v[0-9]", t)),
        ({"extra_body": {"structured_outputs": {"choice": ["up", "down"]}}}, lambda t: t in ("up", "down")),
        (
            {"extra_body": {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}},
            lambda t: jsonschema.validate(json.loads(t), SCHEMA) or " " not in t.replace(", ", "").replace(": ", ""),
        ),
    ],
)
def test_response_formats_on_chat_streamed_and_not(client, extra, check):
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=300, temperature=0, **extra)
    r = client.chat.completions.create(**kwargs)
    assert r.choices[0].finish_reason == "stop"
    check(r.choices[0].message.content)
    _, content, finish = streamed(client, **kwargs)
    assert content == r.choices[0].message.content and finish == "stop"


def test_json_object_and_completions_constraints(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=300, temperature=0, response_format={"type": "json_object"}
    )
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    c = client.completions.create(
        model=MODEL, prompt="Numbers:", max_tokens=20, extra_body={"guided_regex": "[0-9]{3}"}
    )
    assert re.fullmatch("[0-9]{3}", c.choices[0].text)
    c = client.completions.create(
        model=MODEL,
        prompt="JSON:",
        max_tokens=300,
        temperature=0,
        stream=True,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
    )
    jsonschema.validate(json.loads("".join(chunk.choices[0].text for chunk in c)), SCHEMA)


def test_constrained_logprobs_are_finite_json(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=5, logprobs=True, top_logprobs=3, extra_body={"guided_choice": ["yes"]}
    )
    assert r.choices[0].message.content == "yes"
    for position in r.choices[0].logprobs.content:
        assert all(alt.logprob >= -9999.0 for alt in position.top_logprobs)


@pytest.mark.parametrize(
    "kwargs,param_fragment",
    [
        ({"extra_body": {"guided_json": {"type": "nonsense"}}}, "Unsupported type"),
        ({"extra_body": {"guided_regex": "(a"}}, "parenthesis"),
        ({"extra_body": {"guided_grammar": "root ::= nope"}}, "not defined"),
        ({"extra_body": {"guided_regex": "a", "guided_choice": ["b"]}}, "exactly one"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "one output constraint"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"extra_body": {"guided_regex": "a", "guided_decoding_backend": "outlines"}}, "outlines"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "colour": 1}}}, "colour"),
        ({"extra_body": {"guided_whitespace_pattern": " *", "guided_json": SCHEMA}}, "whitespace_pattern"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [{"type": "retrieval"}]}, "function tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"tools": TOOLS, "extra_body": {"use_beam_search": True}}, "use_beam_search"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 123}]}]}, "text"),
    ],
)
def test_bad_requests_are_400_naming_the_problem(client, kwargs, param_fragment):
    kwargs = {"model": MODEL, "messages": ASK, "max_tokens": 5, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kwargs)
    assert param_fragment in err.value.message
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_auto_tool_choice_can_be_turned_off_and_tokenize_takes_null_content(engine):
    with kvloom.serve(engine, served_model_name=MODEL, enable_auto_tool_choice=False) as handle:
        c = openai.OpenAI(base_url=handle.base_url, api_key="unused")
        with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
            c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=3)
        r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200)
        check_calls(r.choices[0].message.tool_calls)
        history = [{"role": "assistant", "content": None}, {"role": "user", "content": "hi"}]
        tok = httpx.post(handle.base_url.removesuffix("/v1") + "/tokenize", json={"model": MODEL, "messages": history})
        assert tok.status_code == 200 and tok.json()["count"] > 0
    with pytest.raises(ValueError, match="unknown tool call parser"):
        kvloom.serve(engine, tool_call_parser="nonesuch")


@pytest.mark.parametrize("parser", ["pythonic", "mistral"])
def test_formats_without_tags_use_vllm_json_forms_for_forced_calls(engine, parser):
    # These formats have no structural tag: required is a JSON list of calls, named the bare arguments.
    with kvloom.serve(engine, served_model_name=MODEL, tool_call_parser=parser) as handle:
        c = openai.OpenAI(base_url=handle.base_url, api_key="unused")
        kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=300, temperature=0)
        required = c.chat.completions.create(tool_choice="required", **kwargs)
        check_calls(required.choices[0].message.tool_calls)
        named = c.chat.completions.create(
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, **kwargs
        )
        check_calls(named.choices[0].message.tool_calls, ["get_weather"])
        calls, _, _ = streamed(c, tool_choice="required", **kwargs)
        assert [(x["name"], x["arguments"]) for x in calls] == [
            (t.function.name, t.function.arguments) for t in required.choices[0].message.tool_calls
        ]


def test_langchain_chatopenai_and_llamaindex_openailike_call_tools_through_the_server(server):
    pytest.importorskip("langchain_openai")
    pytest.importorskip("llama_index.llms.openai_like")
    from langchain_openai import ChatOpenAI
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.openai_like import OpenAILike

    chat = ChatOpenAI(base_url=server.base_url, api_key="unused", model=MODEL, temperature=0, max_tokens=200)
    message = chat.bind_tools(TOOLS, tool_choice="any").invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] in SCHEMAS
    jsonschema.validate(message.tool_calls[0]["args"], SCHEMAS[message.tool_calls[0]["name"]])

    def get_time(city: str) -> str:
        """Local time of a city."""
        return "noon"

    llm = OpenAILike(
        api_base=server.base_url,
        api_key="unused",
        model=MODEL,
        is_chat_model=True,
        is_function_calling_model=True,
        temperature=0,
        max_tokens=200,
    )
    response = llm.chat_with_tools([FunctionTool.from_defaults(get_time)], user_msg="Time?", tool_required=True)
    selections = llm.get_tool_calls_from_response(response)
    assert selections[0].tool_name == "get_time" and isinstance(selections[0].tool_kwargs.get("city"), str)

"""Tool-call parsers: extraction per format, the registry, template detection, and streaming == extraction."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvloom.tool_parsers import (
    ExtractedToolCalls,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    NamedToolParser,
    PythonicToolParser,
    RequiredToolParser,
    ToolParser,
    ToolParserManager,
    parser_for_template,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now"}},
]
W = '{"city": "Paris", "days": 3}'
U = '{"city": "Zürich 東京 🌧", "note": "a } tricky { \\" string"}'
ID = re.compile(r"call_[0-9a-f]{24}")


def calls_of(result: ExtractedToolCalls) -> list[tuple[str, str]]:
    assert all(ID.fullmatch(call.id) for call in result.tool_calls)
    return [(call.name, call.arguments) for call in result.tool_calls]


# (text, content, [(name, arguments)]) per format.
HERMES_CASES = [
    (f'<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>', None, [("get_weather", W)]),
    (
        f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\nDone.',
        "Let me check.\n\n\nDone.",
        [("get_weather", W), ("get_time", "{}")],
    ),
    (  # SmolLM2: a list inside one tag; "parameters" for "arguments"
        f'<tool_call>[{{"name": "get_weather", "parameters": {W}}}, {{"name": "get_time", "arguments": {{}}}}]'
        "</tool_call>",
        None,
        [("get_weather", W), ("get_time", "{}")],
    ),
    (f'<tool_call>{{"arguments": {U}, "name": "get_weather"}}</tool_call>', None, [("get_weather", U)]),
    (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Z\\u00fcrich\\"}"}</tool_call>',
        None,
        [("get_weather", '{"city": "Zürich"}')],
    ),
    ('<tool_call>{"name": "get_time"}</tool_call> ok', " ok", [("get_time", "{}")]),
    ("No tools needed: Paris is sunny.", "No tools needed: Paris is sunny.", []),
    ("<tools> are not <tool_call>s", "<tools> are not <tool_call>s", []),
    ('<tool_call>\n{"name": get_weather}\n</tool_call>', '<tool_call>\n{"name": get_weather}\n</tool_call>', []),
    # an unknown key, or no name: the whole block is content
    (
        '<tool_call>{"name": "f", "foo": 1, "arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "foo": 1, "arguments": {}}</tool_call>',
        [],
    ),
    ('<tool_call>{"arguments": {"a": 1}}</tool_call>', '<tool_call>{"arguments": {"a": 1}}</tool_call>', []),
    # an extra closing brace after a call is dropped with its end tag
    ('<tool_call>{"name": "f", "arguments": {"a": 1}}}\n</tool_call>\nbye', "\nbye", [("f", '{"a": 1}')]),
    # unbalanced JSON ends at the end tag
    ('<tool_call>{"name": "f", "arguments": {"a": 1</tool_call>x', "x", [("f", '{"a": 1')]),
    ('<tool_call>{"name": "f", "arguments": {"a": [1, 2', None, [("f", '{"a": [1, 2')]),  # cut off
    ('Hi <tool_call>{"name": "get_wea', 'Hi <tool_call>{"name": "get_wea', []),  # cut off before the commit
    ('<tool_call>{"name": "f", "arguments": ', None, [("f", "")]),
    ('  \n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n  ', None, [("f", "{}")]),
]

LLAMA_CASES = [
    (f'{{"name": "get_weather", "parameters": {W}}}', None, [("get_weather", W)]),
    (
        f'<|python_tag|>{{"name": "get_weather", "parameters": {U}}}; {{"name": "get_time", "arguments": {{}}}}',
        None,
        [("get_weather", U), ("get_time", "{}")],
    ),
    (
        '{"type": "function", "name": "get_time", "parameters": {}}\n\nThat is all.',
        "\n\nThat is all.",
        [("get_time", "{}")],
    ),
    ('The answer is {"name": "x"}', 'The answer is {"name": "x"}', []),
    (' {"answer": 42}', ' {"answer": 42}', []),
    ('{"name": "get_time", "parameters": "{\\"tz\\": \\"UTC\\"}"}', None, [("get_time", '{"tz": "UTC"}')]),
    ('{"name": "f", "parameters": {"q": "caf', None, [("f", '{"q": "caf')]),
    ('{"name": "f", "param', '{"name": "f", "param', []),
    ('<|python_tag|>brave_search.call(query="x")', '<|python_tag|>brave_search.call(query="x")', []),
    ('{"name": "f", "parameters": {}}; oops', "oops", [("f", "{}")]),
]

MISTRAL_CASES = [
    (f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {W}}}]', None, [("get_weather", W)]),
    (
        f'Sure. [TOOL_CALLS] [{{"name": "get_weather", "arguments": {U}}}, {{"name": "get_time", "arguments": {{}}}}]',
        "Sure. ",
        [("get_weather", U), ("get_time", "{}")],
    ),
    (f"[TOOL_CALLS]get_weather[ARGS]{W}[TOOL_CALLS]get_time[ARGS]{{}}", None, [("get_weather", W), ("get_time", "{}")]),
    ('[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{"tz": "UTC"}', None, [("get_time", '{"tz": "UTC"}')]),
    ("[TOOL_CALLS] is how I call tools", "[TOOL_CALLS] is how I call tools", []),
    ("Plain [TOOL answer", "Plain [TOOL answer", []),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Par', None, [("get_weather", '{"city": "Par')]),
    ('[TOOL_CALLS][{"name": "f", "arguments": "{\\"a\\": 1}"}]', None, [("f", '{"a": 1}')]),
    ('[TOOL_CALLS][{"nome": "f"}]', '[TOOL_CALLS][{"nome": "f"}]', []),
]

PYTHONIC_CASES = [
    (
        '[get_weather(city="Paris", days=3), get_time()]',
        None,
        [("get_weather", '{"city": "Paris", "days": 3}'), ("get_time", "{}")],
    ),
    (
        " [api.search(q='Zürich 🌧', opts={'n': 2, 'safe': True}, tags=['a', None], x=-1.5)] \n",
        None,
        [("api.search", '{"q": "Zürich 🌧", "opts": {"n": 2, "safe": true}, "tags": ["a", null], "x": -1.5}')],
    ),
    ("[1, 2, 3]", "[1, 2, 3]", []),
    ("[get_time()] and more", "[get_time()] and more", []),
    ("[f(x)]", "[f(x)]", []),  # positional arguments are not calls
    ("[f(x={1, 2})]", "[f(x={1, 2})]", []),  # a set is not JSON
    ("[link](http://x)", "[link](http://x)", []),
    ('[get_weather(city="Par', '[get_weather(city="Par', []),  # cut off: never parsed
    ("Hello", "Hello", []),
]

REQUIRED_CASES = [
    (
        f'[{{"name": "get_weather", "parameters": {W}}}, {{"name": "get_time", "arguments": {{}}}}]',
        None,
        [("get_weather", W), ("get_time", "{}")],
    ),
    (f' [ {{"name": "get_weather", "parameters": {U}}} ] ', None, [("get_weather", U)]),
    ('[{"name": "f", "parameters": {"a": ', None, [("f", '{"a": ')]),
    ("not json", "not json", []),
    ('[{"foo": 1}]', '[{"foo": 1}]', []),
]

PARSERS = {
    "hermes": (HermesToolParser(TOOLS), HERMES_CASES),
    "llama3_json": (Llama3JsonToolParser(TOOLS), LLAMA_CASES),
    "mistral": (MistralToolParser(TOOLS), MISTRAL_CASES),
    "pythonic": (PythonicToolParser(TOOLS), PYTHONIC_CASES),
    "required": (RequiredToolParser(TOOLS), REQUIRED_CASES),
}
ALL_CASES = [(name, *case) for name, (_, cases) in PARSERS.items() for case in cases]


@pytest.mark.parametrize(("parser_name", "text", "content", "calls"), ALL_CASES)
def test_extract_tool_calls(parser_name, text, content, calls):
    result = PARSERS[parser_name][0].extract_tool_calls(text)
    assert result.content == content
    assert calls_of(result) == calls


def test_named_tool_parser_takes_the_whole_output_as_arguments():
    parser = NamedToolParser(TOOLS, "get_weather")
    assert calls_of(parser.extract_tool_calls(f"\n {W} \n")) == [("get_weather", W)]
    assert parser.extract_tool_calls(W).content is None
    stream = parser.stream()
    content, deltas = stream.feed("")
    assert content == "" and len(deltas) == 1 and deltas[0].name == "get_weather" and deltas[0].arguments == ""
    assert ID.fullmatch(deltas[0].id)
    assert [d.arguments for d in stream.feed(' {"city": ')[1]] == ['{"city":']  # trailing space waits
    assert [d.arguments for d in stream.feed('"Oslo"} ')[1]] == [' "Oslo"}']
    assert stream.finish() == ("", [])
    assert [(c.name, c.arguments) for c in stream.tool_calls] == [("get_weather", '{"city": "Oslo"}')]


def test_arguments_stream_as_they_are_written():
    stream = HermesToolParser().stream()
    assert stream.feed("Checking. <tool_call>\n{") == ("Checking. ", [])
    assert stream.feed('"name": "get_weather", ') == ("", [])  # the "arguments" key has not come yet
    _, deltas = stream.feed('"arguments": {"city": "Par')
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].name == "get_weather"
    assert deltas[0].arguments == '{"city": "Par' and ID.fullmatch(deltas[0].id)
    assert stream.tool_calls == []
    _, deltas = stream.feed('is"}}\n</tool_call>')
    assert [(d.index, d.id, d.name, d.arguments) for d in deltas] == [(0, None, None, 'is"}')]
    assert [(c.name, c.arguments) for c in stream.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    assert stream.finish() == ("", [])


def test_marker_prefix_is_held_back_then_released():
    stream = HermesToolParser().stream()
    assert stream.feed("Hello <tool") == ("Hello ", [])
    assert stream.feed("s are fun") == ("<tools are fun", [])
    stream = HermesToolParser().stream()
    assert stream.feed("Hi <tool_ca") == ("Hi ", [])
    assert stream.finish() == ("<tool_ca", [])
    stream = MistralToolParser().stream()
    assert stream.feed("Plain [TOOL") == ("Plain ", [])
    assert stream.feed("S] text") == ("[TOOLS] text", [])


def test_whitespace_only_content_is_none_and_never_streamed():
    parser = HermesToolParser()
    text = '\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\n<tool_call>{"name": "g"}</tool_call>\n'
    assert parser.extract_tool_calls(text).content is None
    stream = parser.stream()
    assert all(stream.feed(ch)[0] == "" for ch in text) and stream.finish()[0] == ""


def test_registry():
    assert ToolParserManager.names() == ["hermes", "llama3_json", "mistral", "pythonic"]
    assert ToolParserManager.get_tool_parser("hermes") is HermesToolParser
    assert ToolParserManager.get_tool_parser("mistral").needs_special_tokens
    assert not HermesToolParser.needs_special_tokens
    with pytest.raises(ValueError, match="'qwen'.*hermes, llama3_json, mistral, pythonic"):
        ToolParserManager.get_tool_parser("qwen")

    @ToolParserManager.register("test_only")
    class _Parser(ToolParser):
        pass

    try:
        assert ToolParserManager.get_tool_parser("test_only") is _Parser and _Parser.name == "test_only"
    finally:
        del ToolParserManager._parsers["test_only"]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (None, "hermes"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", "hermes"),
        ("{{- '<tool_call>\\n' }}{{ tool_call | tojson }}", "hermes"),
        ("{%- if tools %}<|python_tag|>{% endif %}", "llama3_json"),
        ('{{ "ipython" }} Respond as {"name": function name, "parameters": dictionary}', "llama3_json"),
        ("{{ '[TOOL_CALLS]' + tool_calls | tojson }}", "mistral"),
        ("<|python_tag|> [func_name1(params_name1=params_value1, params_name2=params_value2...)]", "pythonic"),
    ],
)
def test_parser_for_template(template, expected):
    assert parser_for_template(template) == expected


def test_structural_tags():
    tag = HermesToolParser().structural_tag(TOOLS, parallel_tool_calls=False)
    params = TOOLS[0]["function"]["parameters"]
    assert tag == {
        "type": "structural_tag",
        "format": {
            "type": "triggered_tags",
            "triggers": ["<tool_call>"],
            "tags": [
                {
                    "type": "tag",
                    "begin": '<tool_call>\n{"name": "get_weather", "arguments": ',
                    "content": {"type": "json_schema", "json_schema": params},
                    "end": "}\n</tool_call>",
                },
                {
                    "type": "tag",
                    "begin": '<tool_call>\n{"name": "get_time", "arguments": ',
                    "content": {"type": "json_schema", "json_schema": {"type": "object"}},
                    "end": "}\n</tool_call>",
                },
            ],
            "at_least_one": False,
            "stop_after_first": True,
        },
    }
    llama = Llama3JsonToolParser().structural_tag(TOOLS, parallel_tool_calls=True)["format"]
    assert llama["triggers"] == ['{"name": "'] and not llama["stop_after_first"]
    assert llama["tags"][0]["begin"] == '{"name": "get_weather", "parameters": ' and llama["tags"][0]["end"] == "}"
    assert MistralToolParser().structural_tag(TOOLS, True) is None
    assert PythonicToolParser().structural_tag(TOOLS, True) is None


@pytest.mark.parametrize("parser_cls", [HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser])
def test_rendered_calls_parse_back_and_prompts_name_the_tools(parser_cls):
    parser = parser_cls(TOOLS)
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": W}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "Europe/Zürich"}}},
    ]
    parsed = parser.extract_tool_calls(parser.render_tool_calls(calls))
    assert parsed.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 3}),
        ("get_time", {"tz": "Europe/Zürich"}),
    ]
    prompt = parser.system_prompt(TOOLS)
    assert "get_weather" in prompt and "get_time" in prompt
    result = parser.render_tool_result("18°C", "get_weather")
    assert result["role"] in ("user", "ipython") and "18°C" in result["content"]


def test_hermes_prompt_and_result_shape():
    parser = HermesToolParser()
    prompt = parser.system_prompt(TOOLS)
    assert "<tools>\n" + json.dumps(TOOLS[0]["function"]) + "\n" in prompt
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in prompt
    assert parser.render_tool_result("18", None) == {"role": "user", "content": "<tool_response>\n18\n</tool_response>"}


def test_parsers_import_without_torch_or_the_engine():
    sdk = Path(__file__).resolve().parents[2] / "sdk"
    code = (
        "import sys, types\n"
        "sys.modules['torch'] = sys.modules['transformers'] = None\n"
        "pkg = types.ModuleType('kvloom'); pkg.__path__ = [sys.argv[1]]; sys.modules['kvloom'] = pkg\n"
        "import kvloom.tool_parsers\n"
        "assert not [m for m in sys.modules if m.startswith('kvloom.engine')]\n"
    )
    subprocess.run([sys.executable, "-c", code, str(sdk)], check=True)


# --- streaming: any chunking of any text (including cut-off prefixes) streams what extract_tool_calls returns ---


def chunked(text: str, sizes: list[int]) -> list[str]:
    chunks, i, k = [], 0, 0
    while i < len(text):
        size = sizes[k % len(sizes)] if sizes else len(text)
        chunks.append(text[i : i + size])
        i, k = i + size, k + 1
    return chunks


def check_stream(parser: ToolParser, text: str, sizes: list[int]) -> None:
    expected = parser.extract_tool_calls(text)
    stream = parser.stream()
    content, first, arguments = "", [], []
    for step in [*(stream.feed(chunk) for chunk in chunked(text, sizes)), stream.finish()]:
        content += step[0]
        for delta in step[1]:
            if delta.index == len(first):  # a new call opens with its id and name
                assert delta.id is not None and delta.name is not None
                first.append((delta.id, delta.name))
                arguments.append("")
            else:  # later deltas continue the newest call only
                assert delta.index == len(first) - 1 and delta.id is None and delta.name is None
            arguments[delta.index] += delta.arguments
    assert content == (expected.content or "")
    assert [name for _, name in first] == [call.name for call in expected.tool_calls]
    assert arguments == [call.arguments for call in expected.tool_calls]
    assert [(c.id, c.name, c.arguments) for c in stream.tool_calls] == [
        (i, n, a) for (i, n), a in zip(first, arguments)
    ]


STREAM_CASES = [(name, case[0]) for name, (_, cases) in PARSERS.items() for case in cases]
STREAM_CASES += [("named", f" {U}\n"), ("named", "")]
STREAM_PARSERS = {name: parser for name, (parser, _) in PARSERS.items()} | {"named": NamedToolParser(TOOLS, "f")}


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(STREAM_CASES), st.lists(st.integers(1, 8)), st.one_of(st.none(), st.integers(0, 200)))
def test_streaming_matches_extraction(case, sizes, cut):
    parser_name, text = case
    check_stream(STREAM_PARSERS[parser_name], text if cut is None else text[:cut], sizes)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 8)))
def test_content_before_a_call_is_streamed_before_it(sizes):
    before = ["Let me check the weather.\n", "\nAnd the time: "]
    text = (
        f'{before[0]}<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>'
        f'{before[1]}<tool_call>\n{{"name": "get_time", "arguments": {{}}}}\n</tool_call>'
    )
    stream, content, opened = HermesToolParser().stream(), "", 0
    for chunk in chunked(text, sizes):
        delta_content, deltas = stream.feed(chunk)
        content += delta_content
        for delta in deltas:
            if delta.name is not None:
                assert content.startswith("".join(before[: opened + 1]))
                opened += 1
    assert opened == 2

"""render_chat: tools through a template that renders them and one that ignores them, tool_choice checks."""

from __future__ import annotations

import pytest

from kvloom.chat_utils import FirstCallOnly, render_chat
from kvloom.tool_parsers import PythonicToolParser

from kvloom_testing import build_tokenizer

# A Qwen2.5-like template that renders tools, calls and results itself.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>{{ c['function']['name'] }}"
    "{{ c['function']['arguments'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}


class TokenizerEngine:
    """What render_chat needs of an engine: the tokenizer and its chat template."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def get_tokenizer(self):
        return self.tokenizer

    def apply_chat_template(
        self, messages, add_generation_prompt=True, chat_template=None, continue_final_message=False, **kw
    ):
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kw
        )
        return self.tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return TokenizerEngine(build_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def text(engine, prompt) -> str:
    return engine.tokenizer.decode(prompt.prompt_token_ids)


def test_a_template_that_renders_tools_gets_them(engine):
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [CALL]}]
    out = text(engine, render_chat(engine, history, tools=TOOLS, chat_template=TOOL_TEMPLATE))
    assert "<tools>lookup;</tools>" in out and '<tool_call>lookup{"q": "x"}</tool_call>' in out  # arguments decoded
    assert "Function results come back" not in out  # kvloom's own instructions are not added


def test_a_template_that_ignores_tools_gets_them_in_the_system_message(engine):
    history = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    out = text(engine, render_chat(engine, history, tools=TOOLS))
    assert out.startswith("<|im_start|>system\nBe brief.\n\n# Tools")  # developer -> system, tools appended
    assert '<tool_call>\n{"name": "lookup", "arguments": {"q": "x"}}\n</tool_call>' in out
    assert "<tool_response>\n42\n</tool_response>" in out
    none = text(engine, render_chat(engine, history, tools=TOOLS, tool_choice="none"))
    assert "# Tools" not in none and "<tool_response>\n42" in none  # not offered, history still rendered


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS + TOOLS}, "used twice"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "non-empty name"),
        ({"tools": TOOLS, "enable_auto_tool_choice": False}, "enable-auto-tool-choice"),
        ({"chat_template_kwargs": {"tokenize": True}}, "tokenize"),
        ({"chat_template": "{% if %}"}, "chat template"),
        ({"tool_call_parser": "xml"}, "unknown tool call parser"),
    ],
)
def test_bad_requests_raise_naming_the_problem(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        render_chat(engine, [{"role": "user", "content": "q"}], **kwargs)


def test_tool_choice_constraints_and_parsers(engine):
    q = [{"role": "user", "content": "q"}]
    auto = render_chat(engine, q, tools=TOOLS)
    assert auto.structured_outputs.kind == "structural_tag" and auto.tool_parser.name == "hermes"
    required = render_chat(engine, q, tools=TOOLS, tool_choice="required")
    assert '"tags_with_separator"' in required.structured_outputs.structural_tag
    pythonic = render_chat(engine, q, tools=TOOLS, tool_choice="required", tool_call_parser="pythonic")
    assert pythonic.structured_outputs.kind == "json" and pythonic.tool_parser.name == "required"
    single = render_chat(engine, q, tools=TOOLS, tool_call_parser="pythonic", parallel_tool_calls=False)
    assert isinstance(single.tool_parser, FirstCallOnly) and single.structured_outputs is None


def test_first_call_only_keeps_one_call_streamed_and_not():
    parser = FirstCallOnly(PythonicToolParser(TOOLS))
    output = '[lookup(q="a"), lookup(q="b")]'
    assert [c.arguments for c in parser.extract_tool_calls(output).tool_calls] == ['{"q": "a"}']
    stream = parser.stream()
    deltas = stream.feed(output)[1] + stream.finish()[1]
    assert {d.index for d in deltas} == {0} and [c.arguments for c in stream.tool_calls] == ['{"q": "a"}']

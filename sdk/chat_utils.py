"""Chat requests as the model sees them: OpenAI-shaped messages and tools rendered with the chat template,
`tool_choice` turned into an output constraint, and the parser that reads tool calls back.

The OpenAI server, `LLM.chat` and the LangChain / LlamaIndex adapters all go through `render_chat`,
so a conversation with tools means the same prompt and the same constraint whichever way it arrives.
When a model's template ignores `tools` (the default model's does), the tool definitions and the
calling convention of the tool parser go into the system message, and past calls and tool results
are written in that convention, so that small models can call tools too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jinja2

from kvloom.engine.structured_output import StructuredOutputsParams
from kvloom.tool_parsers import (
    ExtractedToolCalls,
    NamedToolParser,
    RequiredToolParser,
    ToolParser,
    ToolParserManager,
    ToolStream,
    parser_for_template,
)

_ROLES = {"system", "user", "assistant", "tool", "function", "developer"}
# Arguments render_chat sets itself; a client passing them in chat_template_kwargs would break it.
_RESERVED_TEMPLATE_KWARGS = {
    "tokenize",
    "tools",
    "conversation",
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "return_dict",
    "return_tensors",
    "return_assistant_tokens_mask",
}
_PROBE_NAME = "kvloom_template_probe_tool"
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": _PROBE_NAME, "description": "", "parameters": {"type": "object", "properties": {}}},
}


@dataclass
class ChatPrompt:
    """A rendered conversation and what its tools ask of the output."""

    prompt_token_ids: list[int]
    # The output constraint tool_choice implies (None: unconstrained).
    structured_outputs: StructuredOutputsParams | None = None
    # Reads tool calls from the output (None: no tools offered, or tool_choice="none").
    tool_parser: ToolParser | None = None
    # False when the parser's markers are special tokens, which must then stay in the text.
    skip_special_tokens: bool | None = None


def render_chat(
    engine,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool = True,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = True,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict | None = None,
) -> ChatPrompt:
    """Render a conversation (and its tools) to prompt token ids; ValueError names what is wrong.

    `engine` is an LLMEngine or AsyncLLM (anything with get_tokenizer and apply_chat_template).
    tool_choice: None or "auto" (the model chooses; default with tools), "none" (tools are not offered),
    "required" (at least one call) or {"type": "function", "function": {"name": ...}} (that function).
    """
    if hasattr(engine, "render_chat"):  # a remote engine client: its server renders (and checks) the chat
        return engine.render_chat(
            messages,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
        )
    tokenizer = engine.get_tokenizer()
    tools = validate_tools(tools)
    mode, forced = parse_tool_choice(tool_choice, tools)
    if mode == "auto" and tools and not enable_auto_tool_choice:
        raise ValueError('"auto" tool choice requires --enable-auto-tool-choice (it was turned off for this server)')
    extra = dict(chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(extra))
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}")
    source = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    fmt = ToolParserManager.get_tool_parser(tool_call_parser or parser_for_template(_text(source)))(tools)
    offered = tools if mode != "none" else []
    conversation = normalize_messages(messages)
    if offered or any(m.get("tool_calls") or m["role"] == "tool" for m in conversation):
        if template_handles_tools(tokenizer, chat_template):
            if offered:
                extra["tools"] = offered
        else:
            conversation = inline_tools(conversation, offered, fmt)
    try:
        ids = engine.apply_chat_template(
            conversation,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template=chat_template,
            **extra,
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template could not render these messages: {e}") from None
    if not offered:
        return ChatPrompt(ids)
    chosen = [_find(tools, forced)] if mode == "named" else tools
    tag = fmt.structural_tag(chosen, parallel_tool_calls and mode != "named", required=mode != "auto")
    if tag is not None:
        # The model's own call format, constrained: free text and calls (auto), or calls only.
        constraint, parser = StructuredOutputsParams(structural_tag=tag), fmt
    elif mode == "required":
        # vLLM's form for formats without tags: a JSON list of calls (compact, so calls stay short).
        schema = required_schema(tools, parallel_tool_calls)
        constraint, parser = (
            StructuredOutputsParams(json=schema, disable_any_whitespace=True),
            RequiredToolParser(tools),
        )
    elif mode == "named":
        schema = _parameters(chosen[0])
        constraint, parser = (
            StructuredOutputsParams(json=schema, disable_any_whitespace=True),
            NamedToolParser(tools, forced),
        )
    else:
        constraint, parser = None, fmt
        if not parallel_tool_calls:
            # No grammar can stop a second call in this format: the parser keeps the first one only.
            parser = FirstCallOnly(fmt)
    return ChatPrompt(ids, constraint, parser, False if parser.needs_special_tokens else None)


def response_format_constraint(fmt: dict[str, Any]) -> StructuredOutputsParams | None:
    """OpenAI's response_format (text, json_object, json_schema) and vLLM's structural_tag form."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        # strict or not, the output is constrained to the schema (a small model needs that most).
        return StructuredOutputsParams(json=schema)
    if kind == "structural_tag":
        if "format" in fmt:
            return StructuredOutputsParams(structural_tag=fmt)
        # vLLM's older form: {"structures": [{"begin", "schema", "end"}], "triggers": [...]}
        tags = [
            {
                "type": "tag",
                "begin": s["begin"],
                "content": {"type": "json_schema", "json_schema": s["schema"]},
                "end": s["end"],
            }
            for s in fmt.get("structures") or []
        ]
        tag = {
            "type": "structural_tag",
            "format": {"type": "triggered_tags", "triggers": fmt.get("triggers") or [], "tags": tags},
        }
        return StructuredOutputsParams(structural_tag=tag)
    raise ValueError(f"response_format.type must be text, json_object, json_schema or structural_tag, got {kind!r}")


class FirstCallOnly(ToolParser):
    """A parser whose results keep only the first tool call (parallel_tool_calls=False without a grammar)."""

    def __init__(self, inner: ToolParser) -> None:
        super().__init__(inner.tools)
        self.inner = inner
        self.name = inner.name
        self.needs_special_tokens = inner.needs_special_tokens

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        extracted = self.inner.extract_tool_calls(text)
        return ExtractedToolCalls(extracted.content, extracted.tool_calls[:1])

    def stream(self) -> ToolStream:
        return _FirstCallStream(self.inner.stream())


class _FirstCallStream(ToolStream):
    def __init__(self, inner: ToolStream) -> None:
        super().__init__()
        self.inner = inner

    def feed(self, delta_text: str):
        content, deltas = self.inner.feed(delta_text)
        return content, [d for d in deltas if d.index == 0]

    def finish(self):
        content, deltas = self.inner.finish()
        return content, [d for d in deltas if d.index == 0]

    @property
    def tool_calls(self):
        return self.inner.tool_calls[:1]


def validate_tools(tools: list[dict] | None) -> list[dict]:
    """OpenAI function tools, checked: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if not tools:
        return []
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of function tools")
    names = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise ValueError(f"tools[{i}]: only function tools are supported, got {kind!r}")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}].function must be an object with a non-empty name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        if fn["name"] in names:
            raise ValueError(f"tools[{i}]: the function name {fn['name']!r} is used twice")
        names.add(fn["name"])
    return [{"type": "function", "function": tool["function"]} for tool in tools]


def parse_tool_choice(tool_choice: Any, tools: list[dict]) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", the named function)."""
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(f'tool_choice must be "none", "auto", "required" or a named function, got {tool_choice!r}')
        if tool_choice == "required" and not tools:
            raise ValueError('tool_choice "required" needs tools')
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ValueError('a named tool_choice is {"type": "function", "function": {"name": "..."}}')
    _find(tools, name)
    return "named", name


def required_schema(tools: list[dict], parallel_tool_calls: bool) -> dict:
    """vLLM's schema for tool_choice="required": a JSON list of calls, each a tool's name and parameters."""
    calls = [
        {
            "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]}, "parameters": _parameters(t)},
            "required": ["name", "parameters"],
        }
        for t in tools
    ]
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def normalize_messages(messages: list) -> list[dict]:
    """OpenAI messages as chat templates read them: text content, tool calls with decoded arguments."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ValueError(f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}, got {role!r}")
        message = {k: v for k, v in m.items() if v is not None}
        message["role"] = "system" if m["role"] == "developer" else m["role"]
        message["content"] = message_text(m.get("content"), f"messages[{i}].content")
        if m.get("tool_calls"):
            message["tool_calls"] = [
                _template_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m["tool_calls"])
            ]
        out.append(message)
    return out


def message_text(content: Any, where: str) -> str:
    """The text of a message's content: a string, None, or a list of text parts (joined by newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(f"{where}[{j}]: content part type {kind!r} is not supported; kvloom serves text models")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{j}].text must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def template_handles_tools(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the chat template renders the `tools` it is given (many do; the default model's does not)."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL], chat_template=chat_template, tokenize=False
        )
    except (jinja2.TemplateError, TypeError, ValueError):
        return False
    return _PROBE_NAME in text


def inline_tools(conversation: list[dict], tools: list[dict], fmt: ToolParser) -> list[dict]:
    """For templates that ignore tools: definitions in the system message, calls and results as text."""
    out = []
    call_names: dict[str, str] = {}
    for m in conversation:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            for c in calls:
                call_names[c.get("id", "")] = c["function"]["name"]
            text = fmt.render_tool_calls(calls)
            m["content"] = f"{m['content']}\n{text}" if m["content"] else text
        if m["role"] == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id", ""))
            m = fmt.render_tool_result(m["content"], name)
        out.append(m)
    prompt = fmt.system_prompt(tools) if tools else None
    if prompt:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _template_call(call: Any, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise ValueError(f"{where}.function.arguments is not valid JSON") from None
    return {**call, "type": "function", "function": {"name": fn["name"], "arguments": arguments or {}}}


def _find(tools: list[dict], name: str) -> dict:
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool
    raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def _text(template: Any) -> str | None:
    return template if isinstance(template, str) else None

"""Tool-call records, the parser and stream base classes, and the registry of parsers by name."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class ToolCall:
    """One function call the model made, in OpenAI's shape."""

    id: str
    name: str
    arguments: str


@dataclass
class ExtractedToolCalls:
    """A whole response split into its text and its calls."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class ToolCallDelta:
    """What one streaming step adds to one call."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def make_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolStream:
    """Incremental parser for one response; subclasses implement `_advance` over `self._text` from `self._pos`.

    Content that is whitespace only so far is held back, because a response whose text outside its calls is
    only whitespace reports content None: the stream must not have emitted that whitespace.
    """

    def __init__(self) -> None:
        self._text = ""
        self._pos = 0
        self._calls: list[ToolCall] = []
        self._open: ToolCall | None = None
        self._content_out: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._held_whitespace = ""
        self._has_content = False

    def feed(self, delta_text: str) -> tuple[str, list[ToolCallDelta]]:
        self._text += delta_text
        self._advance(final=False)
        return self._drain()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        self._advance(final=True)
        self._close_call()
        return self._drain()

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self._calls)

    def _advance(self, final: bool) -> None:
        """Consume what can be decided from the text so far; with `final`, everything."""
        raise NotImplementedError

    def _emit_content(self, text: str) -> None:
        if self._has_content:
            self._content_out.append(text)
            return
        self._held_whitespace += text
        if self._held_whitespace.strip():
            self._has_content = True
            self._content_out.append(self._held_whitespace)
            self._held_whitespace = ""

    def _open_call(self, name: str) -> None:
        self._close_call()
        self._open = ToolCall(make_call_id(), name, "")
        self._deltas.append(ToolCallDelta(len(self._calls), self._open.id, name))

    def _emit_args(self, text: str) -> None:
        assert self._open is not None, "arguments outside a call"
        if not text:
            return
        self._open.arguments += text
        index = len(self._calls)
        if self._deltas and self._deltas[-1].index == index:
            self._deltas[-1].arguments += text
        else:
            self._deltas.append(ToolCallDelta(index, arguments=text))

    def _close_call(self) -> None:
        if self._open is not None:
            self._calls.append(self._open)
            self._open = None

    def _drain(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "".join(self._content_out), self._deltas
        self._content_out, self._deltas = [], []
        return content, deltas


class ToolParser:
    """Base class of the tool-call formats; subclasses register under a name with `ToolParserManager.register`."""

    name: ClassVar[str]
    # True when the format's markers are special tokens: the caller then decodes with skip_special_tokens=False.
    needs_special_tokens: ClassVar[bool] = False
    stream_class: ClassVar[type[ToolStream]]

    def __init__(self, tools: list[dict] | None = None) -> None:
        self.tools = list(tools or [])

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        # One code path for both modes, so a complete text and any streaming of it always agree.
        stream = self.stream()
        content = stream.feed(text)[0] + stream.finish()[0]
        return ExtractedToolCalls(content or None, stream.tool_calls)

    def stream(self) -> ToolStream:
        return self.stream_class()

    # Formats whose calls are tags (begin text naming the function, JSON arguments, end text) can be
    # constrained by an xgrammar structural tag; the others set tag_trigger to None.
    tag_trigger: ClassVar[str | None] = None
    tag_end: ClassVar[str] = ""
    tag_separator: ClassVar[str] = "\n"

    def tag_begin(self, name: str) -> str:
        raise NotImplementedError

    def structural_tag(self, tools: list[dict], parallel_tool_calls: bool, required: bool = False) -> dict | None:
        """An xgrammar structural tag for calls of these tools, or None if the format has none.

        Not required: free text, and a call once the model writes the trigger. Required: calls only,
        at least one, from the first token.
        """
        if self.tag_trigger is None:
            return None
        tags = [
            {
                "type": "tag",
                "begin": self.tag_begin(fn["name"]),
                "content": {"type": "json_schema", "json_schema": fn.get("parameters") or {"type": "object"}},
                "end": self.tag_end,
            }
            for fn in tool_functions(tools)
        ]
        once = not parallel_tool_calls
        if required:
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": self.tag_separator}
            fmt.update(at_least_one=True, stop_after_first=once)
        else:
            fmt = {"type": "triggered_tags", "triggers": [self.tag_trigger], "tags": tags}
            fmt.update(at_least_one=False, stop_after_first=once)
        return {"type": "structural_tag", "format": fmt}

    def system_prompt(self, tools: list[dict]) -> str | None:
        return None

    def render_tool_calls(self, tool_calls: list[dict]) -> str:
        raise NotImplementedError(f"the {self.name!r} tool parser has no text form for past calls")

    def render_tool_result(self, content: str, name: str | None) -> dict:
        raise NotImplementedError(f"the {self.name!r} tool parser has no text form for tool results")


class ToolParserManager:
    """The process-wide table of tool-call formats, by the names of vLLM's --tool-call-parser."""

    _parsers: ClassVar[dict[str, type[ToolParser]]] = {}

    @classmethod
    def register(cls, name: str):
        def decorate(parser_cls: type[ToolParser]) -> type[ToolParser]:
            parser_cls.name = name
            cls._parsers[name] = parser_cls
            return parser_cls

        return decorate

    @classmethod
    def get_tool_parser(cls, name: str) -> type[ToolParser]:
        if name not in cls._parsers:
            raise ValueError(f"unknown tool call parser {name!r}; known parsers: {', '.join(cls.names())}")
        return cls._parsers[name]

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._parsers)


def tool_functions(tools: list[dict]) -> list[dict]:
    """The "function" objects of OpenAI-shaped tools (bare function objects pass through)."""
    return [tool.get("function", tool) for tool in tools]


def tools_as_lines(tools: list[dict]) -> str:
    return "\n".join(json.dumps(fn, ensure_ascii=False) for fn in tool_functions(tools))


def call_name_and_arguments(call: dict) -> tuple[str, Any]:
    """Name and arguments of an OpenAI-shaped call; arguments given as JSON text are decoded."""
    fn = call.get("function", call)
    arguments = fn.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # shown as the string it is rather than dropped
    return fn["name"], arguments

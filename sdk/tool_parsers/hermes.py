"""Hermes format (Qwen2.5/3, Hermes, SmolLM2): <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks."""

from __future__ import annotations

import json

from kvloom.tool_parsers.base import (
    ToolParser,
    ToolParserManager,
    call_name_and_arguments,
    tools_as_lines,
)
from kvloom.tool_parsers.json_calls import WHITESPACE, JsonCallStream, skip

START, END = "<tool_call>", "</tool_call>"


class HermesStream(JsonCallStream):
    """Content with <tool_call> blocks; a block holds one call object, several, or a JSON list of them."""

    marker = START
    stop = END

    def __init__(self) -> None:
        super().__init__()
        self._after_call = self._group

    def _group(self, final: bool) -> bool:
        text = self._text
        j = skip(text, self._pos, WHITESPACE + ",[]")
        if text.startswith("{", j):
            self._pos, self._state = j, self._call_object
            return True
        if text.startswith(END, j):
            self._pos, self._state = j + len(END), self._content
            return True
        if not final and len(text) - j < len(END) and END.startswith(text[j:]):
            return False
        return self._fail(j)

    def _fail(self, j: int) -> bool:
        if len(self._calls) > self._group_calls:
            self._pos, self._state = j, self._drop
            return True
        return super()._fail(j)

    def _drop(self, final: bool) -> bool:
        """Stray text after a block's calls (an extra brace, a bad second call) is dropped with the end tag;
        held until then, since with no end tag at all it reads as content."""
        i = self._text.find(END, self._pos)
        if i >= 0:
            self._pos, self._state = i + len(END), self._content
            return True
        if final:
            self._state = self._content
        return final


@ToolParserManager.register("hermes")
class HermesToolParser(ToolParser):
    """vLLM's `--tool-call-parser hermes`."""

    stream_class = HermesStream

    tag_trigger = START
    tag_end = f"}}\n{END}"
    # Forced calls follow each other directly: offered a newline between calls, small models keep
    # repeating the call; offered only the next call or the end, they end.
    tag_separator = ""

    def tag_begin(self, name: str) -> str:
        return f'{START}\n{{"name": {json.dumps(name)}, "arguments": '

    def system_prompt(self, tools: list[dict]) -> str | None:
        return (
            "# Tools\n\n"
            "You may call one or more functions to help with the user's request. "
            "The functions you can call are described inside <tools></tools>, one JSON signature per line:\n"
            f"<tools>\n{tools_as_lines(tools)}\n</tools>\n\n"
            "To call a function, answer with its name and a JSON object of arguments inside <tool_call></tool_call> "
            "tags, one block per call:\n"
            f'{START}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{END}\n\n'
            "Function results come back inside <tool_response></tool_response> tags. When they answer the request, "
            "reply to the user in plain words."
        )

    def render_tool_calls(self, tool_calls: list[dict]) -> str:
        blocks = []
        for call in tool_calls:
            name, arguments = call_name_and_arguments(call)
            body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
            blocks.append(f"{START}\n{body}\n{END}")
        return "\n".join(blocks)

    def render_tool_result(self, content: str, name: str | None) -> dict:
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}

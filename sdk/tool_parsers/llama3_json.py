"""Llama 3.1/3.2 JSON tool calling: the output is {"name": ..., "parameters": {...}} calls joined by "; "."""

from __future__ import annotations

import json

from kvloom.tool_parsers.base import (
    ToolParser,
    ToolParserManager,
    call_name_and_arguments,
    tools_as_lines,
)
from kvloom.tool_parsers.json_calls import JsonCallStream, skip

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonStream(JsonCallStream):
    """Calls only when the output starts with "{" or <|python_tag|>; anything else, or after the calls, is content."""

    def __init__(self) -> None:
        super().__init__()
        self._state = self._start
        self._content_state = self._raw
        self._after_call = self._after_object

    def _start(self, final: bool) -> bool:
        text = self._text
        j = skip(text, self._pos)
        rest = text[j : j + len(PYTHON_TAG)]
        if not final and (j == len(text) or (len(rest) < len(PYTHON_TAG) and PYTHON_TAG.startswith(rest))):
            return False
        self._emit_content(text[self._pos : j])
        if rest == PYTHON_TAG:
            return self._open_group(j, j + len(PYTHON_TAG), self._next_object)
        return self._open_group(j, j, self._next_object if rest.startswith("{") else self._raw)

    def _next_object(self, final: bool) -> bool:
        text = self._text
        j = skip(text, self._pos)
        if j < len(text) and text[j] == "{":
            self._pos, self._state = j, self._call_object
            return True
        if j == len(text) and not final:
            return False
        return self._fail(j)

    def _after_object(self, final: bool) -> bool:
        text = self._text
        j = skip(text, self._pos)
        if j < len(text) and text[j] == ";":
            self._pos, self._state = j + 1, self._next_object
            return True
        if j == len(text) and not final:
            return False
        self._state = self._raw  # text after the calls (from the whitespace on) is content
        return True


@ToolParserManager.register("llama3_json")
class Llama3JsonToolParser(ToolParser):
    """vLLM's `--tool-call-parser llama3_json`."""

    stream_class = Llama3JsonStream

    tag_trigger = '{"name": "'
    tag_end = "}"
    tag_separator = "; "

    def tag_begin(self, name: str) -> str:
        return f'{{"name": {json.dumps(name)}, "parameters": '

    def system_prompt(self, tools: list[dict]) -> str | None:
        return (
            "You have access to the functions below, one JSON signature per line:\n"
            f"{tools_as_lines(tools)}\n\n"
            "To call a function, answer with nothing but a JSON object of the form "
            '{"name": <function-name>, "parameters": <args-json-object>}. '
            'Separate several calls with "; ". Do not use variables.'
        )

    def render_tool_calls(self, tool_calls: list[dict]) -> str:
        calls = [dict(zip(("name", "parameters"), call_name_and_arguments(call))) for call in tool_calls]
        return "; ".join(json.dumps(call, ensure_ascii=False) for call in calls)

    def render_tool_result(self, content: str, name: str | None) -> dict:
        return {"role": "ipython", "content": content}

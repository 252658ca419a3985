"""Outputs constrained by vLLM-style tool_choice: "required" (a JSON list of calls) or one named function."""

from __future__ import annotations

from kvloom.tool_parsers.base import ToolParser, ToolStream
from kvloom.tool_parsers.json_calls import JsonCallStream, skip


class RequiredStream(JsonCallStream):
    """The output is [{"name": ..., "parameters": {...}}, ...]; anything else (or after the list) is content."""

    def __init__(self) -> None:
        super().__init__()
        self._state = self._start
        self._content_state = self._raw

    def _start(self, final: bool) -> bool:
        text = self._text
        j = skip(text, self._pos)
        if j == len(text) and not final:
            return False
        self._emit_content(text[self._pos : j])
        is_list = text.startswith("[", j)
        return self._open_group(j, j + 1 if is_list else j, self._in_list if is_list else self._raw)


class RequiredToolParser(ToolParser):
    """tool_choice="required": the output is a JSON array of calls (either "parameters" or "arguments")."""

    name = "required"
    stream_class = RequiredStream


class NamedStream(ToolStream):
    """The whole output is the arguments of one known function: its first delta comes with the first feed."""

    def __init__(self, function_name: str) -> None:
        super().__init__()
        self._function_name = function_name

    def _advance(self, final: bool) -> None:
        if self._open is None and not self._calls:
            self._open_call(self._function_name)
        # strip() only grows at the end as text arrives (trailing whitespace waits), so fragments add up.
        arguments = self._text.strip()
        self._emit_args(arguments[self._pos :])
        self._pos = len(arguments)


class NamedToolParser(ToolParser):
    """A named tool_choice: the output is the arguments object of that one function."""

    name = "named"

    def __init__(self, tools: list[dict] | None, name: str) -> None:
        super().__init__(tools)
        self.function_name = name

    def stream(self) -> ToolStream:
        return NamedStream(self.function_name)

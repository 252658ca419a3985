"""Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (older tokenizers) or [TOOL_CALLS]name[ARGS]{...}."""

from __future__ import annotations

import json
import re

from kvloom.tool_parsers.base import ToolParser, ToolParserManager, call_name_and_arguments, tools_as_lines
from kvloom.tool_parsers.json_calls import JsonCallStream, skip

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_NAME = re.compile(r"([\w.\-]+)\s*(?:\[CALL_ID\]\s*\w*\s*)?")


class MistralStream(JsonCallStream):
    """Content, then [TOOL_CALLS] groups: a JSON list of call objects or one `name[ARGS]arguments` call."""

    marker = stop = TOOL_CALLS

    def _group(self, final: bool) -> bool:
        text = self._text
        j = skip(text, self._pos)
        if j == len(text):
            return self._fail(j) if final else False
        self._after_call = self._in_list
        self._pos = j + 1 if text[j] == "[" else j
        self._state = self._in_list if text[j] in "[{" else self._named_call
        return True

    def _named_call(self, final: bool) -> bool:
        text = self._text
        m = _NAME.match(text, self._pos)
        if m is not None and text.startswith(ARGS, m.end()):
            self._open_call(m.group(1))
            self._pos, self._then, self._after_call = m.end() + len(ARGS), self._call_done, self._content
            self._state = self._call_args
            return True
        rest = text[m.end() :] if m else "-"
        if not final and (ARGS.startswith(rest) or CALL_ID.startswith(rest)):
            return False
        return self._fail(self._pos)


@ToolParserManager.register("mistral")
class MistralToolParser(ToolParser):
    """vLLM's `--tool-call-parser mistral`."""

    needs_special_tokens = True
    stream_class = MistralStream

    def system_prompt(self, tools: list[dict]) -> str | None:
        return (
            "You can call the functions below, one JSON signature per line:\n"
            f"{tools_as_lines(tools)}\n\n"
            f"To call functions, answer with {TOOL_CALLS} followed by a JSON list of calls: "
            f'{TOOL_CALLS}[{{"name": <function-name>, "arguments": <args-json-object>}}, ...]'
        )

    def render_tool_calls(self, tool_calls: list[dict]) -> str:
        calls = [dict(zip(("name", "arguments"), call_name_and_arguments(call))) for call in tool_calls]
        return TOOL_CALLS + json.dumps(calls, ensure_ascii=False)

    def render_tool_result(self, content: str, name: str | None) -> dict:
        result = {"content": content} if name is None else {"name": name, "content": content}
        return {"role": "user", "content": f"[TOOL_RESULTS]{json.dumps(result, ensure_ascii=False)}[/TOOL_RESULTS]"}

"""Pythonic tool calling (Llama 3.2/4): the whole output is a Python list of calls, [f(a=1), g(b="x")]."""

from __future__ import annotations

import ast
import json
import re

from kvloom.tool_parsers.base import ToolParser, ToolParserManager, ToolStream, call_name_and_arguments, tools_as_lines
from kvloom.tool_parsers.json_calls import skip

# Every prefix of a call list matches: "[", "[get_wea", "[get_weather(...".
_CALL_LIST_PREFIX = re.compile(r"\[\s*(?:[^\W\d][\w.]*\s*(?:\(.*)?)?", re.DOTALL)


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def parse_call_list(text: str) -> list[tuple[str, str]] | None:
    """(name, JSON arguments) of each call when `text` is a non-empty list of calls with literal keyword
    arguments; None otherwise."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        name = _dotted_name(node.func) if isinstance(node, ast.Call) and not node.args else None
        if name is None or any(kw.arg is None for kw in node.keywords):
            return None
        try:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            calls.append((name, json.dumps(kwargs, ensure_ascii=False, allow_nan=False)))
        except (ValueError, TypeError, SyntaxError, RecursionError):  # not a JSON-shaped literal (a set, bytes...)
            return None
    return calls


class PythonicStream(ToolStream):
    """Holds the output while it may still be a call list; at the end it is either all calls or all content."""

    def __init__(self) -> None:
        super().__init__()
        self._is_content = False
        self._start: int | None = None  # first non-whitespace character
        self._has_open_paren = False  # past "[name(": every continuation still matches the prefix pattern
        self._scan, self._depth, self._quote = 0, 0, ""
        self._list_end: int | None = None

    def _may_be_calls(self) -> bool:
        text = self._text
        if self._start is None:
            self._start = self._scan = skip(text, 0)
            if self._start == len(text):
                self._start = None
                return True
        if not self._has_open_paren:
            if not _CALL_LIST_PREFIX.fullmatch(text, self._start):
                return False
            self._has_open_paren = "(" in text[self._start :]
        if self._list_end is None:
            self._list_end = self._find_list_end()
        return self._list_end is None or not text[self._list_end :].strip()

    def _find_list_end(self) -> int | None:
        """Index just past the bracket closing the list (Python strings skipped), resuming across feeds."""
        text, i = self._text, self._scan
        while i < len(text):
            c = text[i]
            if self._quote:
                if c == "\\":
                    i += 1  # may step past the end: the next feed resumes after the escaped character
                elif c == self._quote:
                    self._quote = ""
            elif c in "'\"":
                self._quote = c
            elif c in "([{":
                self._depth += 1
            elif c in ")]}":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
            i += 1
        self._scan = i
        return None

    def _advance(self, final: bool) -> None:
        if not self._is_content and (final or not self._may_be_calls()):
            calls = parse_call_list(self._text) if final and self._may_be_calls() else None
            for name, arguments in calls or ():
                self._open_call(name)
                self._emit_args(arguments)
                self._close_call()
            self._is_content = calls is None
        if self._is_content:
            self._emit_content(self._text[self._pos :])
            self._pos = len(self._text)


@ToolParserManager.register("pythonic")
class PythonicToolParser(ToolParser):
    """vLLM's `--tool-call-parser pythonic`."""

    stream_class = PythonicStream

    def system_prompt(self, tools: list[dict]) -> str | None:
        return (
            "You can call the functions below, one JSON signature per line:\n"
            f"{tools_as_lines(tools)}\n\n"
            "To call functions, answer with nothing but a Python list of calls with keyword arguments, "
            "for example [func_name1(param_a=value_a, param_b=value_b), func_name2(param=value)]."
        )

    def render_tool_calls(self, tool_calls: list[dict]) -> str:
        calls = []
        for call in tool_calls:
            name, arguments = call_name_and_arguments(call)
            kwargs = arguments.items() if isinstance(arguments, dict) else ()
            calls.append(f"{name}({', '.join(f'{key}={value!r}' for key, value in kwargs)})")
        return f"[{', '.join(calls)}]"

    def render_tool_result(self, content: str, name: str | None) -> dict:
        return {"role": "ipython", "content": content}

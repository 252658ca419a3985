"""Scanning JSON call objects ({"name": ..., "arguments": {...}}) as they are written, shared by the JSON formats.

A call is committed (its first delta sent) once its name is complete and the "arguments" key follows it, or the
object closes; before that, text that turns out not to be a call falls back to content. After the commit the
call stands whatever follows: its arguments text is the raw JSON value as written, cut short if the output is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from kvloom.tool_parsers.base import ToolStream

WHITESPACE = " \t\r\n"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SCALAR = re.compile(r"[\w.+\-]*")
ARGUMENT_KEYS = ("arguments", "parameters")


class NotACall(Exception):
    """The text at hand cannot be a tool call; it is read as content."""


def skip(text: str, i: int, chars: str = WHITESPACE) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def partial_marker(text: str, start: int, marker: str) -> int:
    """Length of the longest tail of text[start:] that may still grow into `marker` (so is held back)."""
    for k in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _decode(literal: str) -> str | None:
    try:
        value = json.loads(literal, strict=False)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


def arguments_text(raw: str) -> str:
    """Arguments as the model wrote them; a JSON string (JSON encoded twice, as some models do) is decoded."""
    raw = raw.strip()
    decoded = _decode(raw) if raw.startswith('"') else None
    return raw if decoded is None else decoded


class JsonEnd:
    """Finds where a JSON value closes, resuming where the last call stopped. Only strings and brackets count,
    so broken JSON inside still ends at its last bracket; a `stop` marker outside strings ends it early."""

    def __init__(self, pos: int, depth: int = 0, stop: str | None = None) -> None:
        self.pos, self.depth, self.stop = pos, depth, stop
        self.in_string = self.escaped = False

    def run(self, text: str) -> int | None:
        """Index just past the value (or of the stop marker), None while open; `pos` is how far it is settled."""
        stop, i = self.stop, self.pos
        while i < len(text):
            c = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif stop and c == stop[0] and stop.startswith(text[i : i + len(stop)]):
                self.pos = i
                return i if text.startswith(stop, i) else None
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.pos = i + 1
                    return i + 1
            i += 1
        self.pos = i
        return None


def _value_end(text: str, i: int, stop: str | None) -> int | None:
    if text[i] in "{[":
        return JsonEnd(i, 0, stop).run(text)
    if text[i] == '"':
        m = _STRING.match(text, i)
        return m.end() if m else None
    end = _SCALAR.match(text, i).end()
    if end == i:
        raise NotACall
    return end if end < len(text) else None


@dataclass
class CallHeader:
    name: str
    arguments: str | None  # None: the value starts at `end` and is streamed; else it was written before the name
    end: int
    closed: bool  # the object's closing brace is consumed


def parse_call_header(text: str, i: int, stop: str | None) -> CallHeader | None:
    """Read the call object at text[i] == "{" up to its commit point; None while more text is needed."""
    name: str | None = None
    arguments: str | None = None
    j, first = i + 1, True
    while True:
        j = skip(text, j)
        if j == len(text):
            return None
        if text[j] == "}":
            if name is None:
                raise NotACall
            return CallHeader(name, "{}" if arguments is None else arguments, j + 1, True)
        if not first:
            if text[j] != ",":
                raise NotACall
            j = skip(text, j + 1)
            if j == len(text):
                return None
        first = False
        m = _STRING.match(text, j)
        if m is None:
            if text[j] == '"':
                return None
            raise NotACall
        key = _decode(m.group())
        j = skip(text, m.end())
        if j == len(text):
            return None
        if text[j] != ":":
            raise NotACall
        j = skip(text, j + 1)
        if key in ARGUMENT_KEYS and arguments is None and name is not None:
            return CallHeader(name, None, j, False)
        if j == len(text):
            return None
        if key in ARGUMENT_KEYS and arguments is None:
            end = _value_end(text, j, stop)
            if end is None:
                return None
            arguments, j = arguments_text(text[j:end]), end
        elif key == "name" and name is None:
            m = _STRING.match(text, j)
            if m is None:
                if text[j] == '"':
                    return None
                raise NotACall
            name = _decode(m.group())
            if not name:
                raise NotACall
            if arguments is not None:
                return CallHeader(name, arguments, m.end(), False)
            j = m.end()
        elif key == "type" and text.startswith('"function"', j):  # some Llama 3.2 outputs carry it
            j += len('"function"')
        elif key == "type" and '"function"'.startswith(text[j:]):
            return None
        else:
            raise NotACall


State = Callable[[bool], bool]


class JsonCallStream(ToolStream):
    """States shared by the JSON formats. Each state reads from `_pos` and returns whether it made progress;
    with `final` it must consume everything. A group is what one marker (or the start of output) opens."""

    marker: ClassVar[str | None] = None  # what opens a group inside content; None: only at the start of output
    stop: ClassVar[str | None] = None  # ends a call even inside unbalanced JSON

    def __init__(self) -> None:
        super().__init__()
        self._state: State = self._content
        self._content_state: State = self._content  # where text outside calls goes
        self._after_call: State = self._in_list
        self._then: State = self._call_tail  # where a call goes when its arguments end
        self._group_start = 0
        self._group_calls = 0
        self._scanner: JsonEnd | None = None
        self._value_kind: str | None = None

    def _advance(self, final: bool) -> None:
        while self._state(final):
            pass

    def _open_group(self, start: int, pos: int, state: State) -> bool:
        self._group_start, self._group_calls = start, len(self._calls)
        self._pos, self._state = pos, state
        return True

    def _group(self, final: bool) -> bool:
        raise NotImplementedError

    def _content(self, final: bool) -> bool:
        """Text before a marker is content; a tail that may become the marker waits."""
        assert self.marker is not None
        text, pos = self._text, self._pos
        i = text.find(self.marker, pos)
        if i >= 0:
            self._emit_content(text[pos:i])
            return self._open_group(i, i + len(self.marker), self._group)
        end = len(text) - (0 if final else partial_marker(text, pos, self.marker))
        self._emit_content(text[pos:end])
        self._pos = end
        return end > pos

    def _raw(self, final: bool) -> bool:
        self._emit_content(self._text[self._pos :])
        progressed, self._pos = self._pos < len(self._text), len(self._text)
        return progressed

    def _fail(self, j: int) -> bool:
        """The text at the group's position `j` is not a call: back to content."""
        if len(self._calls) > self._group_calls:
            self._pos = j  # what follows this group's calls
        elif self.marker is not None:
            self._emit_content(self.marker)
            self._pos = self._group_start + len(self.marker)
        else:
            self._pos = self._group_start
        self._state = self._content_state
        return True

    def _in_list(self, final: bool) -> bool:
        text = self._text
        j = skip(text, self._pos, WHITESPACE + ",")
        if j < len(text) and text[j] == "{":
            self._pos, self._state = j, self._call_object
            return True
        if j < len(text) and text[j] == "]":
            self._pos, self._state = j + 1, self._content_state
            return True
        if j == len(text) and not final:
            return False
        return self._fail(j)

    def _call_object(self, final: bool) -> bool:
        try:
            header = parse_call_header(self._text, self._pos, self.stop)
            if header is None and final:
                raise NotACall
        except NotACall:
            return self._fail(self._pos)
        if header is None:
            return False
        self._open_call(header.name)
        self._pos, self._then = header.end, self._call_tail
        if header.arguments is None:
            self._state = self._call_args
        else:
            self._emit_args(header.arguments)
            self._state = self._call_done if header.closed else self._call_tail
        return True

    def _call_args(self, final: bool) -> bool:
        text, start = self._text, self._pos
        if self._value_kind is None:
            j = skip(text, start)
            if j == len(text) and not final:
                return False
            self._pos = j
            self._value_kind = "" if j == len(text) else '"' if text[j] == '"' else "{" if text[j] in "{[" else "1"
            self._scanner = JsonEnd(j, 0, self.stop)
        pos = self._pos
        if self._value_kind == "{":
            assert self._scanner is not None
            end = self._scanner.run(text)
            upto = end if end is not None else len(text) if final else self._scanner.pos
            self._emit_args(text[pos:upto])
            self._pos = upto
            if end is None and not final:
                return upto > start
        elif self._value_kind == '"':
            m = _STRING.match(text, pos)
            if m is None and not final:
                return pos > start
            self._emit_args(arguments_text(m.group()) if m else "")  # an unterminated string gives no arguments
            self._pos = m.end() if m else len(text)
        elif self._value_kind == "1":
            end = _SCALAR.match(text, pos).end()
            if end == len(text) and not final:
                return pos > start
            self._emit_args(text[pos:end])
            self._pos = end
        self._scanner, self._value_kind, self._state = None, None, self._then
        return True

    def _call_tail(self, final: bool) -> bool:
        """Skip what follows the arguments up to the object's closing brace (other keys are ignored)."""
        if self._scanner is None:
            self._scanner = JsonEnd(self._pos, 1, self.stop)
        end = self._scanner.run(self._text)
        if end is None and not final:
            return False
        self._pos = len(self._text) if end is None else end
        self._scanner, self._state = None, self._call_done
        return True

    def _call_done(self, final: bool) -> bool:
        self._close_call()
        self._state = self._after_call
        return True

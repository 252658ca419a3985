"""Tool-call parsers: a model's text as OpenAI tool_calls, whole or while streaming (vLLM's --tool-call-parser).

Pure Python on purpose: the OpenAI server and the adapters use them without the engine. `extract_tool_calls`
runs the stream over the whole text, so for any chunking the streamed content and argument fragments concatenate
to exactly what it returns. Content is the exact text outside the calls (None when that is only whitespace, which
a stream therefore holds back until real text arrives). A JSON call is committed, and its first delta sent, once
`"arguments":` follows its complete name (or its object closes); from then on it stays a call, and output cut off
inside it leaves the arguments text written so far.
"""

from __future__ import annotations

import re

from kvloom.tool_parsers.base import (
    ExtractedToolCalls,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    ToolParserManager,
    ToolStream,
)
from kvloom.tool_parsers.constrained import NamedToolParser, RequiredToolParser
from kvloom.tool_parsers.hermes import HermesToolParser
from kvloom.tool_parsers.llama3_json import Llama3JsonToolParser
from kvloom.tool_parsers.mistral import MistralToolParser
from kvloom.tool_parsers.pythonic import PythonicToolParser

__all__ = [
    "ExtractedToolCalls",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "NamedToolParser",
    "PythonicToolParser",
    "RequiredToolParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "ToolParserManager",
    "ToolStream",
    "parser_for_template",
]

# Templates that teach the pythonic format show its shape, e.g. "[func_name1(params_name1=params_value1, ...".
_PYTHONIC_EXAMPLE = re.compile(r"\[\s*func(?:tion)?_?name\w*\s*\(")


def parser_for_template(chat_template: str | None) -> str:
    """The parser for the tool-call format a chat template teaches; "hermes" when it teaches none, since kvloom
    then renders hermes instructions itself."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    # Before llama3_json: pythonic Llama templates also mention ipython and the python tag.
    if _PYTHONIC_EXAMPLE.search(template):
        return "pythonic"
    if "<|python_tag|>" in template or ("ipython" in template and '"parameters"' in template):
        return "llama3_json"
    return "hermes"

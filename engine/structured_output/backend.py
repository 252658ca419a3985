"""The grammar backend: xgrammar turns constraints into per-request token matchers for one tokenizer.

Chosen over llguidance by measurement on the default model's tokenizer (docs/benchmarks.md): both
mask a 49k vocabulary in well under 1% of a decode step, and xgrammar is what vLLM and SGLang use
by default, reads vLLM's `structural_tag` format as is, and says when a grammar is complete.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import torch

from kvloom.engine.structured_output.params import StructuredOutputsParams

# The longest whitespace run allowed between JSON tokens (deep pretty-printing fits); without a bound a
# small model can emit whitespace until max_tokens. disable_any_whitespace gives compact JSON instead.
MAX_JSON_WHITESPACE = 20
# xgrammar prefixes its C++ errors with "[time] file.cc:line: "; users need only the message.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _xgr():
    # Imported on first use: engines that never constrain an output do not load it.
    import xgrammar

    return xgrammar


class XgrammarBackend:
    """Builds grammars (validation, on the caller's thread), compiles them and makes matchers."""

    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self._compiler = None
        self._lock = threading.Lock()
        self.num_words = (vocab_size + 31) // 32

    def grammar(self, params: StructuredOutputsParams) -> Any:
        """The xgrammar Grammar of a constraint; ValueError with xgrammar's reason if it is invalid."""
        xgr = _xgr()
        kind = params.kind
        try:
            if kind == "json":
                schema = _bounded_strings_as_patterns(json.loads(params.json))
                if params.disable_additional_properties:
                    schema = _close_objects(schema)
                return _json_grammar(xgr, json.dumps(schema), params, strict=True)
            if kind == "json_object":
                # Any object (OpenAI's json_object): the object schema without strict mode's closing.
                return _json_grammar(xgr, '{"type": "object"}', params, strict=False)
            if kind == "regex":
                return xgr.Grammar.from_regex(params.regex)
            if kind == "choice":
                return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in params.choice))
            if kind == "grammar":
                return _ebnf_or_lark(xgr, params.grammar)
            return xgr.Grammar.from_structural_tag(json.dumps(_fix_tag_schemas(json.loads(params.structural_tag))))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"invalid structured_outputs.{kind}: {_message(e)}") from None

    def compile(self, grammar) -> Any:
        """Compile a grammar against the tokenizer (seconds for big schemas: never on the step loop)."""
        return self._get_compiler().compile_grammar(grammar)

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgr()
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def matcher(self, compiled) -> Any:
        return _xgr().GrammarMatcher(compiled)

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return torch.full((rows, self.num_words), -1, dtype=torch.int32)

    @staticmethod
    def fill_bitmask(matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def stop_only_mask(self) -> torch.Tensor:
        """A bitmask row allowing exactly the stop tokens."""
        row = torch.zeros(self.num_words, dtype=torch.int64)
        for t in self.stop_token_ids:
            row[t // 32] |= 1 << (t % 32)
        # Bit 31 set makes a negative int32: wrap the int64 value into int32's range.
        return torch.where(row >= 2**31, row - 2**32, row).to(torch.int32)


def _json_grammar(xgr, schema: str, params: StructuredOutputsParams, strict: bool):
    any_whitespace = not params.disable_any_whitespace
    return xgr.Grammar.from_json_schema(
        schema,
        any_whitespace=any_whitespace,
        max_whitespace_cnt=MAX_JSON_WHITESPACE if any_whitespace else None,
        strict_mode=strict,
    )


def _ebnf_or_lark(xgr, text: str):
    """vLLM takes GBNF/EBNF grammars and Lark grammars in the same field: try EBNF first."""
    try:
        return xgr.Grammar.from_ebnf(text)
    except RuntimeError as ebnf_error:
        try:
            return xgr.Grammar.from_lark(text)
        except (RuntimeError, ValueError):
            raise ebnf_error from None


def _bounded_strings_as_patterns(schema: Any) -> Any:
    """Length-bounded strings rewritten as the equivalent pattern.

    xgrammar 0.2 compiles minLength/maxLength strings to a character class that admits raw control
    characters (invalid in JSON); the pattern form excludes them. Like xgrammar's own rule, the
    pattern admits no escapes (no quote or backslash in such strings).
    """
    if isinstance(schema, list):
        return [_bounded_strings_as_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _bounded_strings_as_patterns(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not {"pattern", "format", "enum", "const"} & set(out):
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = r'^[^\x00-\x1f"\\\ud800-\udfff]' + f"{{{low},{high}}}$"
    return out


def _fix_tag_schemas(tag: Any) -> Any:
    """A structural tag whose JSON-schema contents get the same treatment as `json` constraints."""
    if isinstance(tag, list):
        return [_fix_tag_schemas(t) for t in tag]
    if not isinstance(tag, dict):
        return tag
    out = {k: _fix_tag_schemas(v) for k, v in tag.items()}
    if out.get("type") == "json_schema" and "json_schema" in out:
        out["json_schema"] = _bounded_strings_as_patterns(out["json_schema"])
        out.setdefault("max_whitespace_cnt", MAX_JSON_WHITESPACE)
    return out


def _close_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object, even those that allow more.

    (xgrammar's strict mode already closes objects that say nothing; this also closes the others.)
    """
    if isinstance(schema, list):
        return [_close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _close_objects(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out["additionalProperties"] = False
    return out


def _message(error: Exception) -> str:
    return _CPP_PREFIX.sub("", str(error).strip().splitlines()[0] if str(error).strip() else repr(error))

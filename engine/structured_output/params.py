"""What a request asks its output to match: vLLM's StructuredOutputsParams (and the older GuidedDecodingParams)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

# The constraint kinds; a request names exactly one.
KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# Backend names older vLLM clients send (`guided_decoding_backend`); kvloom has one, xgrammar.
ACCEPTED_BACKENDS = ("auto", "xgrammar")


@dataclass
class StructuredOutputsParams:
    """One output constraint: a JSON schema, a regex, a choice of strings, an EBNF/Lark grammar,
    any JSON object, or an xgrammar structural tag (vLLM's `structured_outputs`)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.json_object is False:
            self.json_object = None
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise ValueError(f"structured outputs need exactly one of {', '.join(KINDS)}; got {what}")
        if self.json is not None:
            self.json = _schema_text(self.json, "json")
        if self.structural_tag is not None:
            self.structural_tag = _schema_text(self.structural_tag, "structural_tag")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError("structured_outputs.regex must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("structured_outputs.grammar must be a non-empty EBNF or Lark grammar string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or any(not isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            self.choice = list(self.choice)
        if self.json_object is not None and self.json_object is not True:
            raise ValueError("structured_outputs.json_object must be true when given")
        if self.whitespace_pattern is not None:
            raise ValueError(
                "structured_outputs.whitespace_pattern is not supported by kvloom's grammar backend (xgrammar); "
                "use disable_any_whitespace=True for compact JSON"
            )

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def key(self) -> tuple:
        """A hashable identity of the constraint (grammars are compiled once per key)."""
        value = getattr(self, self.kind)
        return (
            self.kind,
            tuple(value) if isinstance(value, list) else value,
            self.disable_any_whitespace,
            self.disable_additional_properties,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from their defaults (the JSON form from_dict reads)."""
        out = {}
        for f in fields(StructuredOutputsParams):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = json.loads(value) if f.name in ("json", "structural_tag") else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredOutputsParams:
        """Build from a JSON body (the server's `structured_outputs` field); unknown keys are refused."""
        if not isinstance(data, dict):
            raise ValueError("structured_outputs must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown structured_outputs field(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name for StructuredOutputsParams (`SamplingParams(guided_decoding=...)`)."""

    backend: str | None = None

    def __post_init__(self) -> None:
        check_backend(self.backend)
        super().__post_init__()

    def to_structured_outputs(self) -> StructuredOutputsParams:
        values = {f.name: getattr(self, f.name) for f in fields(StructuredOutputsParams)}
        return StructuredOutputsParams(**values)


def check_backend(backend: str | None) -> None:
    """Refuse a grammar backend kvloom does not have (older clients may ask for outlines or guidance)."""
    if backend is not None and backend.split(":")[0] not in ACCEPTED_BACKENDS:
        raise ValueError(
            f"guided decoding backend {backend!r} is not available; kvloom uses xgrammar "
            f"(accepted: {', '.join(ACCEPTED_BACKENDS)})"
        )


def _schema_text(value: Any, name: str) -> str:
    """A JSON document as canonical text (dicts are serialized; strings must parse)."""
    if isinstance(value, dict):
        # Key order is kept: xgrammar emits object properties in the schema's order.
        return json.dumps(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.{name} is not valid JSON: {e}") from None
        if not isinstance(parsed, (dict, bool)):
            raise ValueError(f"structured_outputs.{name} must be a JSON object")
        return value
    raise ValueError(f"structured_outputs.{name} must be a JSON object or its text, got {type(value).__name__}")

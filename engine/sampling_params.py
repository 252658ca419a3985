"""Sampling parameters with vLLM's field names, defaults and validation."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields

from kvloom.engine.structured_output.params import GuidedDecodingParams, StructuredOutputsParams

_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


class RequestOutputKind(enum.Enum):
    """What each streamed RequestOutput carries: everything so far, only the new part, or only the end."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """Per-request generation settings (vLLM's `SamplingParams`)."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias, in [-100, 100]).
    logit_bias: dict[int, float] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Constrained decoding: the output must match a JSON schema, regex, choice list or grammar.
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's older name for structured_outputs; moved there on construction.
    guided_decoding: GuidedDecodingParams | None = None
    # Legacy fields still sent by wrappers written for older vLLM releases.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    _all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop else []
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids else []
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None:
            self.seed = int(self.seed)
        self._merge_structured_outputs()
        self._verify()
        self._all_stop_token_ids = set(self.stop_token_ids)

    @property
    def sampling_type_is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def num_samples(self) -> int:
        """How many sequences are generated (best_of of them, n returned)."""
        return self.best_of or self.n

    def _verify(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.best_of is not None and (not isinstance(self.best_of, int) or self.best_of < self.n):
            raise bad("best_of", f"must be an integer >= n ({self.n})")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64 - self.num_samples:
            raise bad("seed", f"must be in [-2**63, 2**64 - {self.num_samples}] (a 64-bit seed per sample)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "must be > 0")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", "must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be -1 or 0 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 (or None for as many as fit)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not -1 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be None, -1 (full vocabulary) or an integer in [0, {MAX_LOGPROBS}]")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise bad("truncate_prompt_tokens", "must be >= 1")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be a string or a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative token ids")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must be a dict of token id -> bias")
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise bad("logit_bias", "must map integer token ids to numbers") from None
            if any(k < 0 or not -100.0 <= v <= 100.0 for k, v in self.logit_bias.items()):
                raise bad("logit_bias", "must map token ids >= 0 to biases in [-100, 100]")
        self._verify_beam_search()
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", "must be a RequestOutputKind")

    def _verify_beam_search(self) -> None:
        """vLLM <= 0.6's legacy beam search fields: use_beam_search=True asks for a beam search of
        width best_of (or n) returning the n best beams; what it cannot honour is refused by name."""
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise ValueError(f"SamplingParams.length_penalty must be a finite number, got {lp!r}")
        if not any(self.early_stopping is v or self.early_stopping == v for v in (True, False, "never")):
            raise ValueError(
                f'SamplingParams.early_stopping must be True, False or "never", got {self.early_stopping!r}'
            )
        if not self.use_beam_search:
            for name, is_default in (
                ("length_penalty", self.length_penalty == 1.0),
                ("early_stopping", not self.early_stopping),
            ):
                if not is_default:
                    raise ValueError(f"SamplingParams.{name} applies to beam search only: set use_beam_search=True")
            return
        conflicts = [
            name
            for name, is_default in (
                ("temperature", self.temperature == 0),
                ("top_p", self.top_p == 1.0),
                ("top_k", self.top_k == 0),
                ("min_p", self.min_p == 0.0),
                ("presence_penalty", self.presence_penalty == 0.0),
                ("frequency_penalty", self.frequency_penalty == 0.0),
                ("repetition_penalty", self.repetition_penalty == 1.0),
                ("stop", not self.stop),
                ("stop_token_ids", not self.stop_token_ids),
                ("min_tokens", self.min_tokens == 0),
                ("logprobs", self.logprobs is None),
                ("prompt_logprobs", self.prompt_logprobs is None),
                ("logit_bias", not self.logit_bias),
                (
                    "structured_outputs (response_format, guided_*, a forced tool_choice)",
                    self.structured_outputs is None,
                ),
                ("truncate_prompt_tokens", self.truncate_prompt_tokens is None),
                ("detokenize", self.detokenize),
                ("skip_special_tokens", self.skip_special_tokens),
                ("spaces_between_special_tokens", self.spaces_between_special_tokens),
            )
            if not is_default
        ]
        if conflicts:
            raise ValueError(
                f"use_beam_search=True cannot be combined with {', '.join(conflicts)} (beam search is "
                "deterministic and ranks whole sequences; temperature must be 0, the rest at their defaults)"
            )

    def to_beam_search_params(self):
        """BeamSearchParams of a use_beam_search request: width best_of (or n); max_tokens None: as many as fit."""
        from kvloom.engine.beam_search import BeamSearchParams

        return BeamSearchParams(
            beam_width=self.num_samples,
            max_tokens=self.max_tokens if self.max_tokens is not None else 2**31 - 1,
            ignore_eos=self.ignore_eos,
            length_penalty=float(self.length_penalty),
            include_stop_str_in_output=self.include_stop_str_in_output,
            early_stopping=self.early_stopping,
        )

    def _merge_structured_outputs(self) -> None:
        for name in ("structured_outputs", "guided_decoding"):
            value = getattr(self, name)
            if isinstance(value, dict):
                cls = StructuredOutputsParams if name == "structured_outputs" else GuidedDecodingParams
                setattr(self, name, cls.from_dict(value) if cls is StructuredOutputsParams else cls(**value))
            elif value is not None and not isinstance(value, StructuredOutputsParams):
                raise TypeError(f"SamplingParams.{name} must be a StructuredOutputsParams, got {type(value).__name__}")
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("set structured_outputs or its older name guided_decoding, not both")
            guided = self.guided_decoding
            if isinstance(guided, GuidedDecodingParams):
                guided = guided.to_structured_outputs()
            self.structured_outputs, self.guided_decoding = guided, None

    def clone(self, **changes) -> SamplingParams:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values.update(changes)
        return SamplingParams(**values)

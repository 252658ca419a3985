"""Beam search settings and results with vLLM's names (`BeamSearchParams`, `BeamSearchSequence`, `BeamSearchOutput`).

The search itself runs in the front end over the engine (kvloom.beam_search), as vLLM's does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kvloom.engine.outputs import Logprob

EARLY_STOPPING_VALUES = (True, False, "never")


@dataclass
class BeamSearchParams:
    """Settings of one beam search (vLLM's `BeamSearchParams`, plus transformers' `early_stopping`).

    The search is transformers' `generate(num_beams=beam_width, do_sample=False,
    length_penalty=..., early_stopping=..., max_new_tokens=max_tokens)`; kvloom.beam_search says
    exactly what it computes. `temperature` is accepted for vLLM's signature and must be 0: the
    search is deterministic. `include_stop_str_in_output` keeps the EOS token's text at the end of
    a sequence that ended with it.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    # transformers' (and vLLM <= 0.6's) name: True stops once beam_width sequences ended; False stops
    # when the best live beam, scored at its current length, cannot beat the worst ended one;
    # "never" only when no live beam could beat it at any length up to max_tokens.
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"BeamSearchParams.{name} {rule}, got {getattr(self, name)!r}")

        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise bad("beam_width", "must be an integer >= 1")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if self.temperature != 0:
            raise bad(
                "temperature", "must be 0 (kvloom's beam search is deterministic, as transformers' do_sample=False)"
            )
        if not any(self.early_stopping is v or self.early_stopping == v for v in EARLY_STOPPING_VALUES):
            raise bad("early_stopping", 'must be True, False or "never"')
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be a bool")


@dataclass
class BeamSearchSequence:
    """One finished beam: the prompt and generated token ids and what they scored.

    `tokens` holds the prompt's ids followed by the generated ones (EOS included when the beam
    ended with it), `logprobs` one dict per generated token (the candidates its step looked at,
    token id -> Logprob), `cum_logprob` the sum of the generated tokens' log-probabilities and
    `text` the decoded prompt and output (as vLLM's LLM.beam_search returns them). `score` is the
    length-penalized score the beams were ranked by (transformers' `sequences_scores`).
    """

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    lora_request: Any = None
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    score: float = 0.0
    num_prompt_tokens: int = field(default=0, repr=False)

    @property
    def output_tokens(self) -> list[int]:
        """The generated token ids (without the prompt's)."""
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    """The best `beam_width` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]

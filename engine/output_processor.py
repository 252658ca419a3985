"""Front end of a step: detokenize new tokens, apply stop strings, build RequestOutputs.

A request with n > 1 (or best_of) runs as several engine sequences; this module folds them back
into one RequestOutput per request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvloom.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from kvloom.engine.outputs import (
    CompletionOutput,
    Logprob,
    PoolingOutput,
    PoolingRequestOutput,
    RequestMetrics,
    RequestOutput,
)
from kvloom.engine.sampling_params import RequestOutputKind, SamplingParams
from kvloom.engine.scheduler.output import Logprobs

if TYPE_CHECKING:
    from kvloom.engine.core import EngineCoreOutputs


@dataclass(eq=False)
class SequenceState:
    """Text and log-probabilities of one generated sequence."""

    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0
    sent_text: int = 0
    sent_finish: bool = False


@dataclass(eq=False)
class RequestState:
    """Everything the front end tracks for one user request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[SequenceState]
    metrics: RequestMetrics
    lora_request: Any = None
    prompt_logprobs: list | None = None
    num_cached_tokens: int | None = None
    num_finished: int = 0
    # Streaming consumers (the async engine) attach a callback that receives each RequestOutput.
    on_output: Any = None

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.seqs)


class OutputProcessor:
    """Keeps per-request front-end state and turns engine progress into RequestOutputs."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        # Engine sequence id -> (request state, sequence index).
        self.seq_map: dict[str, tuple[RequestState, int]] = {}
        self._token_text: dict[int, str] = {}

    def add_request(self, state: RequestState, seq_ids: list[str]) -> None:
        self.requests[state.request_id] = state
        for i, seq_id in enumerate(seq_ids):
            self.seq_map[seq_id] = (state, i)

    def process(self, core: EngineCoreOutputs, now: float | None = None) -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs to emit and the sequence ids that a stop string ended."""
        now = now or time.time()
        stopped: list[str] = []
        touched: dict[str, RequestState] = {}
        for seq_id, entries in core.prompt_logprobs.items():
            entry = self.seq_map.get(seq_id)
            if entry is not None and entry[1] == 0:
                state = entry[0]
                if state.prompt_logprobs is None:
                    state.prompt_logprobs = [None]
                state.prompt_logprobs.extend(self._logprob_dict(e) for e in entries)
        for out in core.outputs:
            entry = self.seq_map.get(out.req_id)
            if entry is None:
                continue
            state, index = entry
            seq = state.seqs[index]
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
                state.num_cached_tokens = out.num_cached_tokens
            state.metrics.last_token_time = now
            token_id = out.token_id
            seq.token_ids.append(token_id)
            lp = out.logprobs
            if lp is not None:
                seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + lp.logprob
                if seq.logprobs is not None:
                    seq.logprobs.append(self._logprob_dict(lp))
            if seq.detokenizer is not None:
                delta = seq.detokenizer.add_tokens([token_id])
                hit = None
                if delta and seq.params.stop:
                    hit = find_stop_string(
                        seq.detokenizer.text, len(delta), seq.params.stop, seq.params.include_stop_str_in_output
                    )
                if hit is not None:
                    seq.text = seq.detokenizer.text[: hit[1]]
                    seq.finish_reason, seq.stop_reason = "stop", hit[0]
                    if out.finish_reason is None:
                        stopped.append(out.req_id)
                else:
                    seq.text = seq.detokenizer.text
            if out.finish_reason is not None and seq.finish_reason is None:
                seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
            if seq.finish_reason is not None:
                state.num_finished += 1
                self.seq_map.pop(out.req_id, None)
            touched[state.request_id] = state
        outputs = []
        for state in touched.values():
            if state.finished:
                state.metrics.finished_time = now
                del self.requests[state.request_id]
            output = self._make_output(state)
            if output is not None:
                outputs.append(output)
        outputs += self._pooled_outputs(core, now)
        return outputs, stopped

    def _pooled_outputs(self, core: EngineCoreOutputs, now: float) -> list[PoolingRequestOutput]:
        """The finished embedding requests of a step (each is one sequence, done in one piece)."""
        outputs = []
        for seq_id, data in core.pooled.items():
            entry = self.seq_map.pop(seq_id, None)
            if entry is None:  # aborted meanwhile
                continue
            state = entry[0]
            state.num_finished = len(state.seqs)
            state.metrics.first_token_time = state.metrics.finished_time = now
            del self.requests[state.request_id]
            outputs.append(
                PoolingRequestOutput(state.request_id, PoolingOutput(data), state.prompt_token_ids, True, state.prompt)
            )
        return outputs

    def abort(self, request_id: str) -> tuple[RequestState | None, list[str]]:
        """Forget a request; returns its state and the engine sequence ids still running."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None, []
        seq_ids = [sid for sid, (st, _) in self.seq_map.items() if st is state]
        for sid in seq_ids:
            del self.seq_map[sid]
        for seq in state.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        state.num_finished = len(state.seqs)
        return state, seq_ids

    def final_output(self, state: RequestState) -> RequestOutput:
        """The finished output of an aborted request, regardless of its output kind."""
        return self._build(state, delta=False)

    def _make_output(self, state: RequestState) -> RequestOutput | None:
        kind = state.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not state.finished:
            return None
        return self._build(state, delta=kind == RequestOutputKind.DELTA)

    def _build(self, state: RequestState, delta: bool) -> RequestOutput:
        seqs = state.seqs
        if state.finished and state.params.best_of and state.params.best_of > state.params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob or 0.0, reverse=True)[: state.params.n]
        completions = []
        for rank, seq in enumerate(seqs):
            # Text that may still turn into a stop string is held back until the sequence ends.
            hold = 0
            if seq.finish_reason is None and seq.params.stop and not seq.params.include_stop_str_in_output:
                hold = max(len(s) for s in seq.params.stop) - 1
            visible = len(seq.text) - hold if hold else len(seq.text)
            if delta:
                if seq.sent_tokens == len(seq.token_ids) and (seq.finish_reason is None or seq.sent_finish):
                    continue
                text = seq.text[seq.sent_text : max(visible, seq.sent_text)]
                token_ids = seq.token_ids[seq.sent_tokens :]
                logprobs = seq.logprobs[seq.sent_tokens :] if seq.logprobs is not None else None
            else:
                text, token_ids = seq.text[:visible], list(seq.token_ids)
                logprobs = list(seq.logprobs) if seq.logprobs is not None else None
            seq.sent_tokens = len(seq.token_ids)
            seq.sent_text = max(visible, seq.sent_text)
            seq.sent_finish = seq.finish_reason is not None
            index = rank if state.params.best_of and state.finished else seq.index
            completions.append(
                CompletionOutput(
                    index,
                    text,
                    token_ids,
                    seq.cumulative_logprob,
                    logprobs,
                    seq.finish_reason,
                    seq.stop_reason,
                    state.lora_request,
                )
            )
        return RequestOutput(
            state.request_id,
            state.prompt,
            state.prompt_token_ids,
            state.prompt_logprobs,
            completions,
            state.finished,
            state.metrics,
            state.lora_request,
            state.num_cached_tokens,
        )

    def _logprob_dict(self, lp: Logprobs) -> dict[int, Logprob]:
        out = {lp.token_id: Logprob(lp.logprob, lp.rank, self._text(lp.token_id))}
        for token_id, value in lp.top.items():
            if token_id not in out:
                out[token_id] = Logprob(value, None, self._text(token_id))
        ranks = sorted(out, key=lambda t: -out[t].logprob)
        for r, token_id in enumerate(ranks, 1):
            if out[token_id].rank is None:
                out[token_id].rank = r
        return out

    def _text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

"""Batched sampling: penalties, temperature, top-k, top-p, min-p, per-request seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvloom.engine.sampling_params import SamplingParams
from kvloom.engine.scheduler.output import Logprobs
from kvloom.kernels import argmax_rows


@dataclass(eq=False)
class SamplingState:
    """What the sampler remembers about one request between steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    # Tokens that must not be produced before min_tokens outputs exist (EOS and stop_token_ids).
    min_tokens_blocked: list[int] = field(default_factory=list)
    # Prompt positions whose log-probabilities were already reported.
    num_prompt_logprobs: int = 0


class Sampler:
    """Turns the logits of the sampling rows into next tokens, all rows at once."""

    def __init__(self, vocab_size: int, seed: int) -> None:
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> tuple[list[int], list | None]:
        logits = logits[:, : self.vocab_size]
        params = [s.params for s in states]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        logits = self._apply_penalties(logits, states)
        greedy = all(p.temperature < 1e-5 for p in params)
        if greedy:
            tokens = argmax_rows(logits)
        else:
            tokens = self._sample(logits, states)
        token_list = tokens.tolist()
        logprobs = None
        if want_logprobs:
            logprobs = [
                None if p.logprobs is None else logprobs_row(raw_logprobs[i], token_list[i], p.logprobs)
                for i, p in enumerate(params)
            ]
        return token_list, logprobs

    def _apply_penalties(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        rows_min = [
            i for i, s in enumerate(states) if s.min_tokens_blocked and len(s.output_token_ids) < s.params.min_tokens
        ]
        rows_pen = [i for i, s in enumerate(states) if has_penalty(s.params)]
        rows_bias = [i for i, s in enumerate(states) if s.params.logit_bias]
        if not rows_min and not rows_pen and not rows_bias:
            return logits
        logits = logits.clone()
        if rows_bias:
            biases = [(i, t, b) for i in rows_bias for t, b in states[i].params.logit_bias.items()]
            rows, tokens, values = (torch.tensor(x) for x in zip(*biases))
            logits.index_put_((rows, tokens), values.to(logits.dtype), accumulate=True)
        for i in rows_min:
            logits[i, states[i].min_tokens_blocked] = float("-inf")
        if rows_pen:
            self._penalize(logits, [states[i] for i in rows_pen], torch.tensor(rows_pen))
        return logits

    def _penalize(self, logits: torch.Tensor, states: list[SamplingState], rows: torch.Tensor) -> None:
        """vLLM's penalties: repetition over prompt+output, presence/frequency over output."""
        v = self.vocab_size
        out_counts = _token_counts([s.output_token_ids for s in states], v)
        in_prompt = _token_counts([s.prompt_token_ids for s in states], v) > 0
        rep = torch.tensor([s.params.repetition_penalty for s in states]).unsqueeze(1)
        freq = torch.tensor([s.params.frequency_penalty for s in states]).unsqueeze(1)
        pres = torch.tensor([s.params.presence_penalty for s in states]).unsqueeze(1)
        sub = logits[rows]
        seen = in_prompt | (out_counts > 0)
        sub = torch.where(seen & (sub > 0), sub / rep, torch.where(seen, sub * rep, sub))
        sub = sub - freq * out_counts - pres * (out_counts > 0).float()
        logits[rows] = sub

    def _sample(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        params = [s.params for s in states]
        is_greedy = torch.tensor([p.temperature < 1e-5 for p in params])
        greedy_tokens = argmax_rows(logits)
        probs = _probs(logits, params)
        # Exponential race (equivalent to sampling from probs); seeded rows draw from their own stream
        # so their samples do not depend on what else is in the batch.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, s in enumerate(states):
            if s.generator is not None:
                noise[i].exponential_(generator=s.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(is_greedy, greedy_tokens, sampled)

    def verify(self, logits: torch.Tensor, state: SamplingState, draft: list[int]) -> list[int]:
        """The tokens one speculative step emits: the accepted prefix of draft, then one more.

        logits holds len(draft) + 1 rows: row j scores the token after draft[:j]. Greedy requests
        accept draft tokens while they equal the argmax, so their output is exactly the
        non-speculative one. Sampled requests use rejection sampling against a deterministic draft
        (Leviathan et al. 2023 with q one-hot): draft[j] is kept with probability p_j(draft[j]);
        on rejection the token comes from p_j with draft[j] removed, renormalized. Every emitted
        token is thereby distributed exactly as without speculation.
        """
        params = state.params
        if params.temperature < 1e-5:
            best = logits[:, : self.vocab_size].argmax(dim=-1).tolist()
            accepted = 0
            while accepted < len(draft) and best[accepted] == draft[accepted]:
                accepted += 1
            return draft[:accepted] + [best[accepted]]
        probs = _probs(logits[:, : self.vocab_size], [params] * logits.shape[0])
        gen = state.generator or self.generator
        uniforms = torch.rand(len(draft), generator=gen).tolist()
        for j, token in enumerate(draft):
            if uniforms[j] < float(probs[j, token]):
                continue
            residual = probs[j].clone()
            residual[token] = 0.0
            return draft[:j] + [_draw(residual, gen)]
        return draft + [_draw(probs[len(draft)], gen)]


def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Per-row sampling distributions after temperature, top-k, top-p and min-p."""
    temp = torch.tensor([p.temperature if p.temperature >= 1e-5 else 1.0 for p in params])
    logits = logits / temp.unsqueeze(1)
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(tp < 1.0 for tp in top_p):
        logits = _top_k_top_p(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    min_p = [p.min_p for p in params]
    if any(min_p):
        threshold = torch.tensor(min_p).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from an unnormalized distribution (exponential race)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


def has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _token_counts(seqs: list[list[int]], vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(len(seqs), vocab_size + 1)
    width = max((len(s) for s in seqs), default=0)
    if width:
        # Pad with an extra bin at index vocab_size, dropped after counting.
        idx = torch.tensor([s + [vocab_size] * (width - len(s)) for s in seqs])
        counts.scatter_add_(1, idx, torch.ones(idx.shape))
    return counts[:, :vocab_size]


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.tensor([t if t > 0 else vocab for t in top_k]).clamp(max=vocab)
    ranks = torch.arange(vocab).unsqueeze(0)
    drop = ranks >= k.unsqueeze(1)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= torch.tensor(top_p).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def logprobs_row(row: torch.Tensor, token_id: int, k: int) -> Logprobs:
    chosen = row[token_id]
    rank = int((row > chosen).sum()) + 1
    k = row.shape[0] if k == -1 else k
    top: dict[int, float] = {}
    if k:
        values, ids = row.topk(k)
        top = dict(zip(ids.tolist(), values.tolist()))
    return Logprobs(token_id, float(chosen), rank, top)

"""Speculative decoding by n-gram prompt lookup: propose the tokens that followed the context's last n-gram.

Outputs of RAG and agent requests often copy spans of their context. When the last n tokens of a
sequence (n from prompt_lookup_max down to prompt_lookup_min) occurred earlier in its prompt or
output, the tokens that followed that earlier occurrence are a cheap guess of what comes next.
The scheduler feeds the guesses after the last token; one forward pass scores every position, and
the sampler keeps the guesses the model agrees with (kvloom.engine.sampler.Sampler.verify).
"""

from __future__ import annotations

import numpy as np

from kvloom.engine.config import SpeculativeConfig
from kvloom.engine.request import Request
from kvloom.engine.sampler import has_penalty


def can_speculate(request: Request) -> bool:
    """Whether a request's output would be identical with guesses verified in one pass.

    Requests whose next-token distribution depends on state the verification pass does not
    replay per position (penalties, logit bias, min_tokens still blocking EOS, a grammar) or that
    report per-token log-probabilities decode one token per step, as without speculation.
    """
    p = request.sampling_params
    return (
        request.structured_output is None
        and p.logprobs is None
        and p.prompt_logprobs is None
        and not p.logit_bias
        and not has_penalty(p)
        and request.num_output_tokens >= p.min_tokens
    )


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.n_min = config.prompt_lookup_min
        self.n_max = config.prompt_lookup_max

    def propose(self, tokens: list[int], max_tokens: int) -> list[int]:
        """Up to min(k, max_tokens) tokens following the latest earlier match of the longest suffix n-gram."""
        k = min(self.k, max_tokens)
        size = len(tokens)
        if k <= 0 or size <= self.n_min:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.n_max, size - 1), self.n_min - 1, -1):
            # Windows arr[i:i+n] for every start i < size - n (the suffix itself excluded).
            windows = np.lib.stride_tricks.sliding_window_view(arr[: size - 1], n)
            hits = np.flatnonzero((windows == arr[size - n :]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start : start + k].tolist()
        return []

"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary rows.

The vocabulary is padded to a multiple of the group size; padded rows are zero and their logits
are cut off after the gather, so every rank ends with the full [tokens, vocab_size] logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.engine.layers.linear import pack_module_weight
from kvloom.engine.parallel import SINGLE, TPContext
from kvloom.kernels import dense_linear, packed_linear, packed_rows


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows are split across ranks; lookups are summed with an all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPContext = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight_packed = None  # the C++ kernel's panels once pack_weight() ran (then `weight` is gone)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(
                f"checkpoint embedding has shape {tuple(loaded.shape)}, expected ({self.vocab_size}, {param.shape[1]})"
            )
        part = loaded[self.start : min(self.start + self.rows, self.vocab_size)]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def pack_weight(self, dtype: torch.dtype = torch.float32) -> int:
        """Keep this rank's rows only in the C++ kernel's packed layout, in dtype (for a module that computes
        logits: an untied LM head, or a tied embedding, whose lookups then read float32 rows from the
        panels); its bytes, 0 if kept as it is."""
        return pack_module_weight(self, dtype)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight_packed is not None:
            return packed_rows(self.weight_packed, ids)
        return F.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._rows(input_ids)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = self._rows(local.masked_fill(outside, 0))
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the whole vocabulary from this rank's rows (an LM head, or a tied embedding:
        both split the vocabulary the same way)."""
        if self.weight_packed is not None:
            logits = packed_linear(hidden, self.weight_packed, self.rows)
        else:
            logits = dense_linear(hidden, self.weight)
        if self.tp.size > 1:
            logits = self.tp.all_gather_last(logits)[..., : self.vocab_size]
        return logits.float()


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection over this rank's vocabulary rows (checkpoint name `lm_head.weight`)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden)

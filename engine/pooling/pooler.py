"""The pooler: the hidden states of each prompt become one vector (CLS, MEAN or LAST), truncated and normalized."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvloom.engine.pooling.params import PoolingParams


def pool(hidden: torch.Tensor, starts: list[int], lens: list[int], params: list[PoolingParams]) -> list[torch.Tensor]:
    """One float32 CPU vector per sequence; sequence i is hidden[starts[i] : starts[i] + lens[i]].

    Matryoshka truncation comes before normalization (vLLM's order), so a shortened vector is a unit vector.
    """
    device = hidden.device
    start = torch.tensor(starts, device=device)
    length = torch.tensor(lens, device=device)
    pooled = torch.empty(len(params), hidden.shape[-1], dtype=torch.float32, device=device)
    for kind in {p.pooling_type for p in params}:
        rows = [i for i, p in enumerate(params) if p.pooling_type == kind]
        idx = torch.tensor(rows, device=device)
        if kind == "CLS":
            pooled[idx] = hidden[start[idx]].float()
        elif kind == "LAST":
            pooled[idx] = hidden[start[idx] + length[idx] - 1].float()
        else:  # MEAN: a segment sum per sequence (index_add keeps float32 precision on long prompts)
            seg_len = length[idx]
            tokens = torch.repeat_interleave(start[idx], seg_len) + _ranges(seg_len)
            seg = torch.repeat_interleave(torch.arange(len(rows), device=device), seg_len)
            sums = torch.zeros(len(rows), hidden.shape[-1], dtype=torch.float32, device=device)
            sums.index_add_(0, seg, hidden[tokens].float())
            pooled[idx] = sums / seg_len[:, None].float()
    out = []
    for i, p in enumerate(params):
        vec = pooled[i, : p.dimensions] if p.dimensions is not None else pooled[i]
        if p.normalize:
            vec = F.normalize(vec, p=2, dim=-1)
        out.append(vec.cpu().clone())
    return out


def _ranges(lengths: torch.Tensor) -> torch.Tensor:
    """0..n-1 for each n in lengths, concatenated."""
    offsets = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return torch.arange(int(lengths.sum()), device=lengths.device) - offsets

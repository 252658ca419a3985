"""Mixture-of-experts layers: top-k routing and a batched expert dispatch over stacked expert weights.

Experts are stored as two 3-D parameters, `gate_up_proj` [E, 2*I, H] (gate rows, then up rows) and
`down_proj` [E, H, I], the layout transformers 5 uses. Under tensor parallelism every rank holds all
experts but only its slice of each expert's intermediate dimension (column-parallel gate/up,
row-parallel down), so the layer's partial output is summed with one all-reduce, as in the dense MLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.engine.parallel import SINGLE, TPContext


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (in float32), the top_k per token, optionally renormalized to sum to one.

    Returns (weights [T, top_k] float32, expert ids [T, top_k]).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act_and_mul: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for every token t.

    The T*k token-expert assignments are sorted by expert, so each expert that received tokens runs
    one matmul over all of them (one Python iteration per expert, none per token); the weighted
    results are scatter-added back to their tokens. x [T, H], gate_up [E, 2I, H], down [E, H, I].
    """
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // top_k
    # One host read per layer: how many assignments each expert got.
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()
    xs = x.index_select(0, token_of)
    ys = torch.empty(num_tokens * top_k, down.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for expert, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            ys[rows] = F.linear(act_and_mul(F.linear(xs[rows], gate_up[expert])), down[expert])
            start += n
    ys = ys * topk_weights.reshape(-1)[order].unsqueeze(1).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, ys)


class FusedMoE(nn.Module):
    """All experts of one layer, stored stacked; returns this rank's partial sum (not yet all-reduced)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPContext = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.full_intermediate = intermediate_size
        self.intermediate = tp.shard(intermediate_size, "moe intermediate size")
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * self.intermediate, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate), requires_grad=False)
        self.gate_up_proj.weight_loader = self.load_gate_up
        self.down_proj.weight_loader = self.load_down

    def forward(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        act_and_mul: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        return fused_experts(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, act_and_mul)

    def _check(self, what: str, loaded: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(loaded.shape) != shape:
            raise ValueError(f"checkpoint tensor for experts' {what} has shape {tuple(loaded.shape)}, expected {shape}")

    def load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """A full [E, 2*I, H] gate/up stack: keep this rank's rows of the gate half and of the up half."""
        full, size, rank = self.full_intermediate, self.intermediate, self.tp.rank
        self._check("gate_up_proj", loaded, (self.num_experts, 2 * full, param.shape[2]))
        param.data[:, :size].copy_(loaded[:, rank * size : (rank + 1) * size])
        param.data[:, size:].copy_(loaded[:, full + rank * size : full + (rank + 1) * size])

    def load_down(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """A full [E, H, I] down stack: keep this rank's input columns."""
        size, rank = self.intermediate, self.tp.rank
        self._check("down_proj", loaded, (self.num_experts, param.shape[1], self.full_intermediate))
        param.data.copy_(loaded[:, :, rank * size : (rank + 1) * size])


class Router(nn.Module):
    """A bias-free linear replicated on every rank: the router [E, H], or Qwen2-MoE's shared-expert gate [1, H]."""

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

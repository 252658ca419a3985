"""Linear layers that know how they are split across tensor-parallel ranks.

Each parameter carries a `weight_loader(param, loaded, shard_id)` that copies this rank's slice
of a checkpoint tensor, so the model files stay plain descriptions of the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.engine.parallel import SINGLE, TPContext


class _Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"checkpoint tensor for {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)


class ColumnParallelLinear(_Linear):
    """Output features split across ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPContext = SINGLE):
        super().__init__(in_features, tp.shard(out_features, "output features"), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        self._copy(param.data, loaded.narrow(0, self.tp.rank * size, size), "column-parallel weight")


class MergedColumnParallelLinear(_Linear):
    """Several column-parallel outputs (gate and up) stored as one matrix for one matmul."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, tp: TPContext = SINGLE):
        self.out_sizes = [tp.shard(n, "output features") for n in out_sizes]
        super().__init__(in_features, sum(self.out_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        size = self.out_sizes[shard_id]
        offset = sum(self.out_sizes[:shard_id])
        self._copy(
            param.data.narrow(0, offset, size), loaded.narrow(0, self.tp.rank * size, size), f"merged shard {shard_id}"
        )


class QKVParallelLinear(_Linear):
    """Query, key and value projections in one matrix, split across ranks by heads."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp: TPContext = SINGLE,
    ):
        self.num_heads = tp.shard(num_heads, "num_attention_heads")
        # With fewer KV heads than ranks each KV head is replicated.
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.head_size = head_size
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str = "q") -> None:
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp.rank
        else:
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size = self.kv_size
            replicas = max(1, self.tp.size // (loaded.shape[0] // self.head_size))
            rank = self.tp.rank // replicas
        self._copy(param.data.narrow(0, offset, size), loaded.narrow(0, rank * size, size), f"{shard_id}_proj")


class RowParallelLinear(_Linear):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPContext = SINGLE):
        super().__init__(tp.shard(in_features, "input features"), out_features, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = self.tp.all_reduce(y)
        # The bias is added once, after the sum.
        return y + self.bias if self.bias is not None else y

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:
            self._copy(param.data, loaded, "row-parallel bias")
            return
        size = param.shape[1]
        self._copy(param.data, loaded.narrow(1, self.tp.rank * size, size), "row-parallel weight")

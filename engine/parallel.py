"""Tensor-parallel context of this process: its rank, the group size and the all-reduce."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPContext:
    """Which shard of each parallel layer this process holds."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x)
        return x

    def shard(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({self.size})")
        return n // self.size


SINGLE = TPContext()

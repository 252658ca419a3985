"""Tensor-parallel context of one worker: its rank, the group size and the collectives it needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TPContext:
    """Which shard of each parallel layer this process holds, and the process group joining the shards."""

    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup when size > 1 (None: the default group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dimension (rank order)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def shard(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({self.size})")
        return n // self.size

    def kv_heads(self, num_kv_heads: int) -> int:
        """KV heads held by this rank: split when they divide evenly, each replicated when fewer than ranks."""
        if num_kv_heads >= self.size:
            return self.shard(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size ({self.size}) must be a multiple of num_key_value_heads ({num_kv_heads}) "
                "when it exceeds it (each KV head is then replicated on size / num_key_value_heads ranks)"
            )
        return 1


SINGLE = TPContext()

"""Rotary position embedding (NeoX half-split layout, as HF Llama) with default/linear/llama3 scaling.

A rotary_dim below head_size rotates only the first rotary_dim dimensions of each head (Phi-3's
partial_rotary_factor) and passes the rest through.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvloom.kernels import TORCH, KernelBackend

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _inv_freq(head_size: int, base: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for every position up to max_position."""

    def __init__(
        self,
        head_size: int,
        max_position: int,
        base: float,
        scaling: dict | None = None,
        kernels: KernelBackend = TORCH,
        rotary_dim: int | None = None,
    ):
        super().__init__()
        self.kernels = kernels
        self.head_size = head_size
        self.rotary_dim = rotary_dim or head_size
        if self.rotary_dim % 2 or self.rotary_dim > head_size:
            raise ValueError(f"rotary dimension {self.rotary_dim} must be even and at most head_dim {head_size}")
        inv_freq = _inv_freq(self.rotary_dim, base, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, H, D], k: [T, kvH, D] rotated at their positions (possibly in place)."""
        if self.rotary_dim == self.head_size:
            return self.kernels.rotary_embedding(positions, q, k, self.cos, self.sin)
        rd = self.rotary_dim
        # Fresh copies in the standard layout (.contiguous() would keep a one-head slice's strides).
        q_rot = q[..., :rd].clone(memory_format=torch.contiguous_format)
        k_rot = k[..., :rd].clone(memory_format=torch.contiguous_format)
        q_rot, k_rot = self.kernels.rotary_embedding(positions, q_rot, k_rot, self.cos, self.sin)
        return torch.cat((q_rot, q[..., rd:]), dim=-1), torch.cat((k_rot, k[..., rd:]), dim=-1)

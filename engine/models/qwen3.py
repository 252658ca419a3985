"""Qwen3: the Llama decoder with an RMSNorm over each head of q and k before rotary."""

from __future__ import annotations

from torch import nn

from kvloom.engine.layers.norm import RMSNorm
from kvloom.engine.models.arch import ArchConfig
from kvloom.engine.models.llama import Attention, DecoderLayer, LlamaForCausalLM
from kvloom.engine.parallel import TPContext
from kvloom.kernels import KernelBackend


class QKNormAttention(Attention):
    """Attention whose q and k heads pass through a per-head norm (replicated across TP ranks).

    Subclasses pick the norm (make_head_norm may return None for none) and may set a logit soft cap.
    """

    def __init__(self, cfg: ArchConfig, kernels: KernelBackend, tp: TPContext, layer_idx: int = 0) -> None:
        super().__init__(cfg, kernels, tp, layer_idx)
        self.q_norm = self.make_head_norm(cfg, kernels)
        self.k_norm = self.make_head_norm(cfg, kernels)

    def make_head_norm(self, cfg: ArchConfig, kernels: KernelBackend) -> nn.Module | None:
        return RMSNorm(cfg.head_size, cfg.rms_norm_eps, kernels)


class Qwen3DecoderLayer(DecoderLayer):
    attention_cls = QKNormAttention


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense models (loads q_norm / k_norm; everything else is Llama's)."""

    layer_cls = Qwen3DecoderLayer

"""Gemma 2 and Gemma 3 (text): scaled embeddings, (1 + weight) norms around attention and MLP,
GELU-tanh MLP, soft-capped logits, sliding-window layers (Gemma 3: q/k norms and a local rope base)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.engine.layers.norm import GemmaRMSNorm
from kvloom.engine.layers.rotary import RotaryEmbedding
from kvloom.engine.models.arch import ArchConfig
from kvloom.engine.models.llama import MLP, LlamaForCausalLM
from kvloom.engine.models.qwen3 import QKNormAttention
from kvloom.engine.parallel import SINGLE, TPContext
from kvloom.kernels import AttentionMetadata, KernelBackend


class GemmaAttention(QKNormAttention):
    def __init__(self, cfg: ArchConfig, kernels: KernelBackend, tp: TPContext, layer_idx: int = 0) -> None:
        super().__init__(cfg, kernels, tp, layer_idx)
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.logits_soft_cap = cfg.attn_logit_softcap
        if self.sliding_window is not None and cfg.local_rope_theta is not None:
            rotary_dim = int(cfg.head_size * cfg.partial_rotary_factor)
            self.rotary = RotaryEmbedding(
                cfg.head_size, cfg.max_position, cfg.local_rope_theta, None, kernels, rotary_dim
            )

    def make_head_norm(self, cfg: ArchConfig, kernels: KernelBackend) -> nn.Module | None:
        return GemmaRMSNorm(cfg.head_size, cfg.rms_norm_eps) if cfg.architecture == "Gemma3ForCausalLM" else None


class GemmaMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, kernels: KernelBackend, tp: TPContext, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(cfg, kernels, tp, layer_idx)
        self.mlp = GemmaMLP(cfg, kernels, tp)
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, positions, x, residual, kv_cache, meta: AttentionMetadata):
        # The residual is added inside the next pre-norm, as the Llama layer does.
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, kv_cache, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma2ForCausalLM and Gemma3ForCausalLM (text only); the forward returns hidden states."""

    layer_cls = GemmaDecoderLayer

    def __init__(self, cfg: ArchConfig, kernels: KernelBackend, tp: TPContext = SINGLE) -> None:
        super().__init__(cfg, kernels, tp)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # sqrt(hidden_size) rounded to the model dtype first, as transformers does.
        return x * torch.tensor(self.cfg.hidden_size**0.5).to(x.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

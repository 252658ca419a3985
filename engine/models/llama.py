"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over the paged KV cache."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvloom.engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kvloom.engine.layers.norm import RMSNorm
from kvloom.engine.layers.rotary import RotaryEmbedding
from kvloom.engine.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from kvloom.engine.lora.adapter import lora_shapes
from kvloom.engine.models.arch import ArchConfig
from kvloom.engine.parallel import SINGLE, TPContext
from kvloom.kernels import AttentionMetadata, KernelBackend


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, kernels: KernelBackend, tp: TPContext, layer_idx: int = 0) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_size, cfg.num_heads, cfg.num_kv_heads, bias=cfg.attention_bias, tp=tp
        )
        # Qwen2 has biases on q/k/v only; Llama's attention_bias covers o_proj too.
        o_bias = cfg.attention_bias and cfg.architecture not in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_size, cfg.hidden_size, bias=o_bias, tp=tp)
        rotary_dim = int(cfg.head_size * cfg.partial_rotary_factor)
        self.rotary = RotaryEmbedding(
            cfg.head_size, cfg.max_position, cfg.rope_theta, cfg.rope_scaling, kernels, rotary_dim
        )
        self.sliding_window = cfg.sliding_window_of(layer_idx)
        # Set by subclasses: per-head q/k norms (both or neither) and an attention logit soft cap.
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        self.logits_soft_cap: float | None = None
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_size = cfg.head_size
        self.scale = cfg.head_size**-0.5
        self.kernels = kernels

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        if self.q_norm is not None:
            # Per-head norms (Qwen3, Gemma 3) see one head per row: [T * heads, head_size].
            q = self.q_norm(q.contiguous().view(-1, self.head_size))
            k = self.k_norm(k.contiguous().view(-1, self.head_size))
        q = q.reshape(-1, self.num_heads, self.head_size)
        k = k.reshape(-1, self.num_kv_heads, self.head_size)
        v = v.view(-1, self.num_kv_heads, self.head_size)
        q, k = self.rotary(positions, q, k)
        k_cache, v_cache = kv_cache
        self.kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        o = self.kernels.paged_attention(
            q,
            k,
            v,
            k_cache,
            v_cache,
            meta,
            self.scale,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
        )
        return self.o_proj(o.reshape(-1, q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig, kernels: KernelBackend, tp: TPContext) -> None:
        super().__init__()
        self.kernels = kernels
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, tp=tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    attention_cls: type[Attention] = Attention  # subclasses swap in a variant (Qwen3: q/k norms)

    def __init__(self, cfg: ArchConfig, kernels: KernelBackend, tp: TPContext, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(cfg, kernels, tp, layer_idx)
        self.mlp = MLP(cfg, kernels, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)

    def forward(self, positions, x, residual, kv_cache, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head; the forward returns hidden states."""

    layer_cls: type[nn.Module] = DecoderLayer  # built as layer_cls(cfg, kernels, tp, layer_idx)

    # Checkpoint name fragment -> (our parameter fragment, shard id) for fused projections.
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, cfg: ArchConfig, kernels: KernelBackend, tp: TPContext = SINGLE) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(self.layer_cls(cfg, kernels, tp, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)
        self.lm_head = None if cfg.tie_word_embeddings else ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings (a subclass may scale them)."""
        return self.embed_tokens(input_ids)

    # ---- LoRA --------------------------------------------------------------------------------
    def lora_targets(self) -> Iterable[tuple[int, nn.Module, list[str]]]:
        """(layer index, linear layer, the PEFT module name of each of its output slices)."""
        for i, layer in enumerate(self.layers):
            yield i, layer.self_attn.qkv_proj, ["q_proj", "k_proj", "v_proj"]
            yield i, layer.self_attn.o_proj, ["o_proj"]
            yield i, layer.mlp.gate_up_proj, ["gate_proj", "up_proj"]
            yield i, layer.mlp.down_proj, ["down_proj"]

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """Full (unsharded) (in_features, out_features) of every projection an adapter may target."""
        return lora_shapes(self.cfg)

    def logits_head(self) -> VocabParallelEmbedding:
        """The module whose rows give the logits: the LM head, or the embedding when they are tied."""
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_head().compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into this model's (possibly fused, sharded) parameters."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            shard_id = None
            for ckpt_part, (our_part, sid) in self.stacked_params.items():
                if ckpt_part in name:
                    name, shard_id = name.replace(ckpt_part, our_part), sid
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                    )
                param.data.copy_(tensor)
            else:
                loader(param, tensor, shard_id) if shard_id is not None else loader(param, tensor)
            loaded.add(name if shard_id is None else f"{name}:{shard_id}")
        expected = set(params)
        missing = sorted(n for n in expected if not any(k == n or k.startswith(n + ":") for k in loaded))
        if missing:
            raise ValueError(f"checkpoint is missing tensors: {', '.join(missing[:8])}")

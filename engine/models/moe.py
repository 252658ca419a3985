"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE): Llama attention with a sparse MoE block as MLP."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch
from torch import nn

from kvloom.engine.layers.moe import FusedMoE, Router, select_experts
from kvloom.engine.models.arch import ArchConfig
from kvloom.engine.models.llama import MLP, DecoderLayer, LlamaForCausalLM
from kvloom.engine.parallel import TPContext
from kvloom.kernels import KernelBackend

# One expert's projection in the per-expert checkpoint layout (Mixtral's w1/w3/w2 under
# block_sparse_moe, renamed to mlp below; Qwen2-MoE's gate/up/down_proj).
_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight$")
_GATE_UP_SLOT = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1}


class SparseMoeBlock(nn.Module):
    """Router, top-k experts and (Qwen2-MoE) a shared expert scaled by a sigmoid gate."""

    def __init__(self, cfg: ArchConfig, kernels: KernelBackend, tp: TPContext) -> None:
        super().__init__()
        self.tp = tp
        self.kernels = kernels
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.gate = Router(cfg.num_experts, cfg.hidden_size)
        self.experts = FusedMoE(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, tp)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(replace(cfg, intermediate_size=cfg.shared_expert_intermediate_size), kernels, tp)
            self.shared_expert_gate = Router(1, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        y = self.tp.all_reduce(self.experts(x, weights, ids, self.kernels.silu_and_mul))
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


class MoeDecoderLayer(DecoderLayer):
    """A Llama decoder layer whose MLP is a SparseMoeBlock when the layer is in cfg.moe_layers."""

    def __init__(self, cfg: ArchConfig, kernels: KernelBackend, tp: TPContext, layer_idx: int = 0) -> None:
        super().__init__(cfg, kernels, tp, layer_idx)
        if layer_idx in cfg.moe_layers:
            self.mlp = SparseMoeBlock(cfg, kernels, tp)


class MoeForCausalLM(LlamaForCausalLM):
    """Mixtral and Qwen2-MoE: the Llama decoder with sparse MoE blocks (Qwen2-MoE may keep dense layers)."""

    layer_cls = MoeDecoderLayer

    def lora_targets(self):
        raise ValueError(
            f"LoRA is not supported for mixture-of-experts models ({self.cfg.architecture}); "
            "create the engine without enable_lora"
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load either expert layout: stacked 3-D `experts.gate_up_proj`/`experts.down_proj` tensors
        (transformers 5) as they are, per-expert 2-D tensors stacked here once a layer's set is complete."""
        if any(getattr(m, "quant", None) is not None for m in self.modules()):
            raise ValueError(
                f"quantized weights are not supported for mixture-of-experts models ({self.cfg.architecture})"
            )
        super().load_weights(self._stack_experts(weights))

    def _stack_experts(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        num_experts = self.cfg.num_experts
        pending: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        for name, tensor in weights:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            match = _EXPERT.match(name)
            if match is None:
                yield name, tensor
                continue
            prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
            if expert >= num_experts:
                raise ValueError(f"checkpoint tensor {name!r} names expert {expert}, but the model has {num_experts}")
            target = prefix + ("gate_up_proj" if proj in _GATE_UP_SLOT else "down_proj")
            parts = pending.setdefault(target, {})
            parts[expert, _GATE_UP_SLOT.get(proj, 0)] = tensor
            slots = 2 if proj in _GATE_UP_SLOT else 1
            if len(parts) == num_experts * slots:
                del pending[target]
                yield target, torch.stack([torch.cat([parts[e, s] for s in range(slots)]) for e in range(num_experts)])
        if pending:
            raise ValueError(f"checkpoint is missing some experts' weights for: {', '.join(sorted(pending)[:8])}")

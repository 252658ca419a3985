"""Phi-3: the Llama decoder with fused qkv_proj / gate_up_proj tensors in the checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from kvloom.engine.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Splits the checkpoint's fused projections into q/k/v and gate/up, so that each goes through
    the (tensor-parallel) weight loader of its slice; partial rotary comes from ArchConfig."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._split_fused(weights))

    def _split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        q = self.cfg.num_heads * self.cfg.head_size
        kv = self.cfg.num_kv_heads * self.cfg.head_size
        for name, tensor in weights:
            fused = ".qkv_proj." in name or ".gate_up_proj." in name
            if fused and not name.endswith(".weight"):
                raise ValueError(f"checkpoint tensor {name!r}: only unquantized fused Phi-3 weights are supported")
            if ".qkv_proj." in name:
                for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv], dim=0)):
                    yield name.replace("qkv_proj", part), piece
            elif ".gate_up_proj." in name:
                for part, piece in zip(("gate_proj", "up_proj"), tensor.chunk(2, dim=0)):
                    yield name.replace("gate_up_proj", part), piece
            else:
                yield name, tensor

    def lora_targets(self):
        # PEFT adapters of Phi-3 target the fused qkv_proj / gate_up_proj, which the LoRA slots do not map.
        raise ValueError("LoRA is not supported for Phi3ForCausalLM; create the engine without enable_lora")

"""BERT encoder (BertModel: all-MiniLM-L6-v2, bge, e5) for embeddings: bidirectional attention, no KV cache.

Each sequence attends to all of its own tokens within one step (the scheduler never splits an
encoder's prompt), so nothing is cached; the forward returns the last layer's hidden states.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kvloom.engine.layers.vocab import VocabParallelEmbedding
from kvloom.engine.models.arch import ArchConfig
from kvloom.engine.parallel import SINGLE, TPContext
from kvloom.kernels import AttentionMetadata, KernelBackend

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], scale: float):
    """Bidirectional attention of each sequence over its own tokens; q, k, v: [T, heads, head_size].

    The sequences are padded into one [B, heads, L, head_size] batch with a key mask, so the whole
    step is one fused attention call.
    """
    device = q.device
    num, width = len(lens), max(lens)
    lengths = torch.tensor(lens, device=device)
    seq = torch.repeat_interleave(torch.arange(num, device=device), lengths)
    pos = torch.arange(q.shape[0], device=device) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(num, width, x.shape[1], x.shape[2])
        out[seq, pos] = x
        return out.transpose(1, 2)

    mask = (torch.arange(width, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask, scale=scale)
    return o.transpose(1, 2)[seq, pos]


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TPContext) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Every token is segment 0 (token_type_ids are zeros for single-text embeddings).
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TPContext) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_size, cfg.num_heads, cfg.num_heads, True, tp)
        self.o_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, True, tp)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, True, tp)
        self.output = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, True, tp)
        self.output_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.num_heads = self.qkv_proj.num_heads
        self.head_size = cfg.head_size
        self.scale = cfg.head_size**-0.5

    def forward(self, x: torch.Tensor, lens: list[int]) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).view(-1, 3, self.num_heads, self.head_size).unbind(1)
        o = encoder_attention(q, k, v, lens, self.scale)
        x = self.attention_norm(x + self.o_proj(o.reshape(x.shape[0], -1)))
        return self.output_norm(x + self.output(self.act(self.intermediate(x))))


class BertEmbeddingModel(nn.Module):
    """BertModel without its pooler head: the runner pools the hidden states (CLS, MEAN or LAST)."""

    # Checkpoint name fragment -> (our fragment, shard id), applied within encoder.layer.{i}.
    _RENAMES = (
        (".attention.self.query.", ".qkv_proj.", "q"),
        (".attention.self.key.", ".qkv_proj.", "k"),
        (".attention.self.value.", ".qkv_proj.", "v"),
        (".attention.output.dense.", ".o_proj.", None),
        (".attention.output.LayerNorm.", ".attention_norm.", None),
        (".intermediate.dense.", ".intermediate.", None),
        (".output.dense.", ".output.", None),
        (".output.LayerNorm.", ".output_norm.", None),
    )

    def __init__(self, cfg: ArchConfig, kernels: KernelBackend, tp: TPContext = SINGLE) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.embeddings = BertEmbeddings(cfg, tp)
        self.layers = nn.ModuleList(BertLayer(cfg, tp) for _ in range(cfg.num_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # Token layout of the step: one-token sequences first, then the longer ones (AttentionMetadata).
        lens = [1] * meta.num_decodes + [n for _, n, _ in meta.prefills]
        x = self.embeddings(input_ids, positions)
        for layer in self.layers:
            x = layer(x, lens)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a BertModel checkpoint (HF names; the pooler head is not used) into this model."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("bert.").removeprefix("model.")
            if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
                continue
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            shard_id = None
            if name.startswith("encoder.layer."):
                name = "layers." + name.removeprefix("encoder.layer.")
                for ckpt_part, our_part, sid in self._RENAMES:
                    if ckpt_part in name:
                        name, shard_id = name.replace(ckpt_part, our_part), sid
                        break
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in BertModel")
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                loader(param, tensor, shard_id) if shard_id is not None else loader(param, tensor)
            elif param.shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            else:
                param.data.copy_(tensor)
            loaded.add(name if shard_id is None else f"{name}:{shard_id}")
        missing = sorted(n for n in params if not any(k == n or k.startswith(n + ":") for k in loaded))
        if missing:
            raise ValueError(f"checkpoint is missing tensors: {', '.join(missing[:8])}")

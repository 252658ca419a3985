"""Per-step attention metadata, built once by the model runner and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each token's KV goes and what each query attends to.

    Tokens are laid out decodes first (one token per sequence), then prefill chunks.
    """

    block_size: int
    slot_mapping: torch.Tensor  # [T] cache slot of every token
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks], null-block padded
    decode_seq_lens: torch.Tensor | None  # [num_decodes] context length including the new token
    # (query start, query length, context length after this chunk) for each prefill chunk.
    prefills: list[tuple[int, int, int]]
    prefill_block_tables: torch.Tensor | None  # [num_prefills, max_blocks]

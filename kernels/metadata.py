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


# Segments up to this many tokens are computed together as one padded batched matmul; longer ones
# (prefill chunks) one matmul each, where padding would waste more than the per-call overhead saves.
PAD_MAX_TOKENS = 64


@dataclass
class LoRAMetadata:
    """Which adapter slot each token uses, as per-token indices and as runs of equal slots.

    The model runner orders sequences so that tokens of one adapter are contiguous; `segments`
    lists those runs (start, end, slot) for tokens with an adapter, and the seg_* tensors hold the
    same for kernels (SGMV: one program per segment and tile). Tokens with slot -1 use no adapter.
    For the torch path, short segments are also laid out as a padded [S, L] grid of token indices
    (`pad_*`), so that all of them take one batched matmul; `long_segments` are the rest.
    """

    token_indices: torch.Tensor  # [T] slot of every token, -1 for none
    segments: list[tuple[int, int, int]]
    seg_starts: torch.Tensor  # [S]
    seg_lens: torch.Tensor  # [S]
    seg_slots: torch.Tensor  # [S]
    max_seg_len: int
    long_segments: list[tuple[int, int, int]]
    pad_index: torch.Tensor | None = None  # [S_short, L] token index (padding repeats a valid token)
    pad_slots: torch.Tensor | None = None  # [S_short] slot of each short segment
    pad_valid: torch.Tensor | None = None  # positions of real tokens in the flattened grid
    pad_rows: torch.Tensor | None = None  # their token indices

    @classmethod
    def from_token_slots(cls, slots: list[int], lens: list[int], device: torch.device) -> LoRAMetadata:
        """Build from each sequence's slot and token count (sequences in batch order)."""
        segments: list[tuple[int, int, int]] = []
        pos = 0
        for slot, n in zip(slots, lens):
            if slot >= 0:
                if segments and segments[-1][2] == slot and segments[-1][1] == pos:
                    segments[-1] = (segments[-1][0], pos + n, slot)
                else:
                    segments.append((pos, pos + n, slot))
            pos += n
        token_indices = torch.repeat_interleave(torch.tensor(slots, dtype=torch.long), torch.tensor(lens))
        starts = torch.tensor([s for s, _, _ in segments], dtype=torch.int32)
        seg_lens = torch.tensor([e - s for s, e, _ in segments], dtype=torch.int32)
        seg_slots = torch.tensor([slot for _, _, slot in segments], dtype=torch.int32)
        short = [seg for seg in segments if seg[1] - seg[0] <= PAD_MAX_TOKENS]
        meta = cls(
            token_indices.to(device),
            segments,
            starts.to(device),
            seg_lens.to(device),
            seg_slots.to(device),
            max((e - s for s, e, _ in segments), default=0),
            [seg for seg in segments if seg[1] - seg[0] > PAD_MAX_TOKENS],
        )
        if short:
            first = torch.tensor([s for s, _, _ in short])
            count = torch.tensor([e - s for s, e, _ in short])
            steps = torch.arange(int(count.max()))
            grid = first[:, None] + torch.minimum(steps[None, :], count[:, None] - 1)
            valid = (steps[None, :] < count[:, None]).flatten().nonzero().squeeze(1)
            meta.pad_index = grid.to(device)
            meta.pad_slots = torch.tensor([slot for _, _, slot in short]).to(device)
            meta.pad_valid = valid.to(device)
            meta.pad_rows = grid.flatten()[valid].to(device)
        return meta

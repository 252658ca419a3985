"""Pure-torch kernels: the CPU path and the reference every other kernel is tested against.

KV cache layout, per layer. Slot s is token s % block_size of block s // block_size; each (block,
head) pair is one contiguous run of block_size * head_size numbers.
- keys: [num_blocks, num_kv_heads, head_size, block_size], dimension-major inside a block so that a
  kernel computes the scores of a whole block with vertical vector operations;
- values: [num_blocks, num_kv_heads, block_size, head_size].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata, LoRAMetadata


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each token's key/value ([T, kv_heads, head_size]) at its slot (in the cache's dtype)."""
    block_size = k_cache.shape[-1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, :, :, offsets] = key.to(k_cache.dtype)
    v_cache[blocks, :, offsets, :] = value.to(v_cache.dtype)


def gather_values(v_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Values of whole block tables, token-major: [B, max_blocks * block_size, kv_heads, head_size]."""
    _, kv_heads, _, head_size = v_cache.shape
    blocks = v_cache[block_tables].permute(0, 1, 3, 2, 4)  # [B, nblk, bs, kvH, D]
    return blocks.reshape(block_tables.shape[0], -1, kv_heads, head_size)


def gather_keys(k_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Keys of whole block tables, token-major: [B, max_blocks * block_size, kv_heads, head_size]."""
    _, kv_heads, head_size, _ = k_cache.shape
    blocks = k_cache[block_tables].permute(0, 1, 4, 2, 3)  # [B, nblk, bs, kvH, D]
    return blocks.reshape(block_tables.shape[0], -1, kv_heads, head_size)


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    decode_attention: Callable | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    prompt_attention: Callable | None = None,
) -> torch.Tensor:
    """Causal attention of a flat batch of tokens over the paged cache.

    query: [T, heads, head_size]; key/value: the same tokens' [T, kv_heads, head_size], already
    written to the cache. Decode tokens come first (one per sequence) and are computed in one
    batched call (by decode_attention when a faster kernel is given); each prefill chunk is
    computed on its own. With sliding_window W a query at position p sees only positions
    p - W + 1 .. p (HF's convention); logits_soft_cap c maps scores s to c * tanh(s / c) before
    the softmax (Gemma 2). prompt_attention(q, k, v, out, scale), when given, computes a prefill
    chunk (q at the last positions of its context k, v; causal, no window or soft cap) into out and
    returns False where it cannot (then SDPA does).
    """
    nd = meta.num_decodes
    # A decode-only step returns the decode kernel's own output (no copy into a second buffer).
    out = None if nd and nd == query.shape[0] else torch.empty_like(query)
    if nd:
        decode = decode_attention or decode_attention_ref
        decoded = decode(
            query[:nd],
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            meta.block_size,
            scale,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
        )
        if out is None:
            return decoded
        out[:nd] = decoded
    for i, (q_start, q_len, ctx_len) in enumerate(meta.prefills):
        q = query[q_start : q_start + q_len]
        offset = ctx_len - q_len
        # Keys before `first` are outside every query's window: neither gathered nor scored.
        first = 0 if sliding_window is None else max(0, offset - sliding_window + 1)
        if ctx_len == q_len:
            # Nothing cached before this chunk: attend to the chunk's own keys.
            k, v = key[q_start : q_start + q_len], value[q_start : q_start + q_len]
        else:
            table = meta.prefill_block_tables[i : i + 1, first // meta.block_size :]
            skip = first % meta.block_size
            # A cache in a narrower dtype than the queries (the CPU bfloat16 mode) is read widened.
            k = gather_keys(k_cache, table)[0, skip : skip + ctx_len - first].to(q.dtype)
            v = gather_values(v_cache, table)[0, skip : skip + ctx_len - first].to(q.dtype)
        if (
            prompt_attention is not None
            and sliding_window is None
            and logits_soft_cap is None
            and prompt_attention(q, k, v, out[q_start : q_start + q_len], scale)
        ):
            continue
        out[q_start : q_start + q_len] = _causal_attention(
            q, k, v, offset, scale, sliding_window, logits_soft_cap, first
        )
    return out


def _causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offset: int,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_start: int = 0,
) -> torch.Tensor:
    """q: [q_len, H, D] at positions offset.., k/v: [offset + q_len - k_start, kvH, D] at positions k_start.."""
    q_len = q.shape[0]
    qh, kh, vh = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    gqa = q.shape[1] != k.shape[1]
    if offset == 0 and sliding_window is None and logits_soft_cap is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
        return o[0].transpose(0, 1)
    rows = torch.arange(q_len, device=q.device).unsqueeze(1) + offset
    cols = torch.arange(k.shape[0], device=q.device).unsqueeze(0) + k_start
    mask = cols <= rows
    if sliding_window is not None:
        mask &= cols > rows - sliding_window
    if logits_soft_cap is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return o[0].transpose(0, 1)
    # Soft-capping changes the scores before the softmax, which SDPA cannot do: compute them here.
    if gqa:
        group = q.shape[1] // k.shape[1]
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
    scores = scores.masked_fill(~mask, float("-inf"))
    o = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), vh)
    return o[0].transpose(0, 1)


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """One query token per row against the first seq_lens[row] tokens of its block table; q: [B, H, D].

    With sliding_window W only the last W of those tokens; logits_soft_cap as in paged_attention.
    """
    b, heads, head_size = q.shape
    k = gather_keys(k_cache, block_tables).to(q.dtype)
    v = gather_values(v_cache, block_tables).to(q.dtype)
    kv_heads = k.shape[2]
    # Group the query heads that share a KV head so one batched matmul serves the group.
    qg = q.view(b, kv_heads, heads // kv_heads, head_size)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale  # [B, kvH, g, L]
    if logits_soft_cap is not None:
        scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
    cols = torch.arange(k.shape[1], device=q.device).unsqueeze(0)
    mask = cols >= seq_lens.unsqueeze(1)
    if sliding_window is not None:
        mask |= cols < (seq_lens - sliding_window).unsqueeze(1)
    scores.masked_fill_(mask.view(b, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = torch.matmul(probs, v.transpose(1, 2))  # [B, kvH, g, D]
    return o.reshape(b, heads, head_size)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """norm(x) * weight; with a residual, (norm(x + residual) * weight, x + residual) as HF Llama orders it."""
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out, residual


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX (half-split) rotation of q [T, H, D] and k [T, kvH, D] with cos/sin tables [max_pos, D/2]."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    return _rotate(q, c, s), _rotate(k, c, s)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x holds [gate | up] on its last dimension; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---- LoRA (grouped by adapter: batched matmuls over runs of tokens sharing a slot, no per-token loop) --
def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMetadata) -> torch.Tensor:
    """s[t] = x[t] @ lora_a[slot(t)].T; x [T, in], lora_a [slots, R, in] -> s [T, R] (zero without adapter)."""
    out = x.new_zeros(x.shape[0], lora_a.shape[1])
    if meta.pad_index is not None:
        grid = torch.bmm(x[meta.pad_index], lora_a[meta.pad_slots].transpose(1, 2))
        out[meta.pad_rows] = grid.view(-1, grid.shape[-1])[meta.pad_valid]
    for start, end, slot in meta.long_segments:
        torch.mm(x[start:end], lora_a[slot].t(), out=out[start:end])
    return out


def lora_expand(y: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, meta: LoRAMetadata) -> None:
    """y[t] += s[t] @ lora_b[slot(t)].T in place; y [T, out] (may be a column slice), lora_b [slots, out, R]."""
    if meta.pad_index is not None:
        grid = torch.bmm(s[meta.pad_index], lora_b[meta.pad_slots].transpose(1, 2))
        y.index_add_(0, meta.pad_rows, grid.view(-1, grid.shape[-1])[meta.pad_valid])
    for start, end, slot in meta.long_segments:
        y[start:end].addmm_(s[start:end], lora_b[slot].t())


def lora_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_indices: torch.Tensor):
    """The plainest form, token by token: delta[t] = x[t] @ A[slot].T @ B[slot].T (for tests)."""
    delta = x.new_zeros(x.shape[0], lora_b.shape[1])
    for t, slot in enumerate(token_indices.tolist()):
        if slot >= 0:
            delta[t] = x[t] @ lora_a[slot].t() @ lora_b[slot].t()
    return delta


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Set to -inf, in place, the logits of tokens a packed bitmask forbids.

    Row i of `bitmask` (int32, bit j of word w allows token 32 * w + j) applies to logits row
    rows[i]; tokens past the bitmask (vocabulary padding) are forbidden too.
    """
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    vocab = logits.shape[1]
    if allowed.shape[1] >= vocab:
        allowed = allowed[:, :vocab]
    else:
        allowed = F.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    logits[rows] = logits[rows].masked_fill(~allowed.to(logits.device), float("-inf"))

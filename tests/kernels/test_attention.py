"""Attention kernels against a dense reference; the C++ CPU kernel against the torch path."""

from __future__ import annotations

import pytest
import torch

from kvloom.kernels import AttentionMetadata, get_backend, torch_ref
from kvloom.kernels.cpu_ops import load_cpu_ops


def random_paged(ctx_lens: list[int], kv_heads: int, head_size: int, block_size: int, seed: int = 0):
    """A cache with each sequence's tokens spread over shuffled blocks, plus its dense K/V."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-n // block_size) for n in ctx_lens]
    total = sum(nblk) + 1
    k_tokens = torch.randn(total * block_size, kv_heads, head_size, generator=g)
    v_tokens = torch.randn(total * block_size, kv_heads, head_size, generator=g)
    # Keys are [num_blocks, kv_heads, head_size, block_size], values [num_blocks, kv_heads, block_size, head_size].
    k_cache = k_tokens.view(total, block_size, kv_heads, head_size).permute(0, 2, 3, 1).contiguous()
    v_cache = v_tokens.view(total, block_size, kv_heads, head_size).permute(0, 2, 1, 3).contiguous()
    order = (torch.randperm(total - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(ctx_lens), max(nblk), dtype=torch.long)
    dense = []
    for i, n in enumerate(ctx_lens):
        tables[i, : nblk[i]] = torch.tensor(order[: nblk[i]])
        order = order[nblk[i] :]
        slots = torch.cat([torch.arange(b * block_size, (b + 1) * block_size) for b in tables[i, : nblk[i]]])[:n]
        dense.append((k_tokens[slots], v_tokens[slots]))
    return k_cache, v_cache, tables, dense


def dense_attention(q, k, v, scale):
    """q: [H, D] for the last position; k/v: [L, kvH, D]."""
    group = q.shape[0] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q, k) * scale
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


@pytest.mark.parametrize("heads,kv_heads,head_size", [(4, 4, 32), (9, 3, 64), (8, 2, 128), (6, 3, 48)])
def test_decode_reference_matches_dense(heads, kv_heads, head_size):
    ctx = [1, 15, 16, 17, 70]
    k_cache, v_cache, tables, dense = random_paged(ctx, kv_heads, head_size, 16)
    q = torch.randn(len(ctx), heads, head_size)
    out = torch_ref.decode_attention_ref(q, k_cache, v_cache, tables, torch.tensor(ctx), 16, 0.3)
    for i, (k, v) in enumerate(dense):
        torch.testing.assert_close(out[i], dense_attention(q[i], k, v, 0.3), rtol=1e-5, atol=1e-5)


# Groups of 1-4 and 6 take the SIMD score loop, 8 the plain one; head sizes 32, 64 and 128 the SIMD value loop
# (on AVX2 three heads of a group at a time, so groups of 4, 6 and 8 run it in parts), 48 the plain one.
@pytest.mark.parametrize(
    "heads,kv_heads,head_size", [(4, 4, 32), (9, 3, 64), (8, 2, 128), (6, 3, 48), (12, 2, 64), (16, 2, 64)]
)
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_matches_torch_reference(heads, kv_heads, head_size, block_size, cache_dtype):
    ops = load_cpu_ops()
    if ops is None:
        pytest.skip("no C++ toolchain: the torch path is used")
    ctx = [1, 7, 16, 33, 200, 513]
    k_cache, v_cache, tables, _ = random_paged(ctx, kv_heads, head_size, block_size, seed=1)
    # A bfloat16 cache (the CPU bfloat16 mode) is widened as it is read: same numbers as the reference's.
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    q = torch.randn(len(ctx), heads, head_size)
    lens = torch.tensor(ctx)
    ref = torch_ref.decode_attention_ref(q, k_cache, v_cache, tables, lens, block_size, 0.125)
    out = ops.paged_attention_decode(q, k_cache, v_cache, tables, lens, block_size, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


def test_cpu_decode_reads_query_rows_at_any_stride():
    """The model hands decode the q slice of its fused qkv rows: the kernel reads it in place."""
    ops = load_cpu_ops()
    if ops is None:
        pytest.skip("no C++ toolchain: the torch path is used")
    ctx = [3, 40, 17]
    k_cache, v_cache, tables, _ = random_paged(ctx, 3, 64, 16, seed=4)
    fused = torch.randn(len(ctx), (9 + 6) * 64)
    q = fused[:, : 9 * 64].view(len(ctx), 9, 64)
    assert not q.is_contiguous()
    lens = torch.tensor(ctx)
    out = ops.paged_attention_decode(q, k_cache, v_cache, tables, lens, 16, 0.125)
    assert out.is_contiguous()
    want = torch_ref.decode_attention_ref(q.contiguous(), k_cache, v_cache, tables, lens, 16, 0.125)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.paged_attention_decode(q.transpose(1, 2), k_cache, v_cache, tables, lens, 16, 0.125)


@pytest.mark.parametrize("device_backend", ["torch", "default"])
def test_paged_attention_mixes_decodes_and_prefill_chunks(device_backend):
    """A flat batch: two decodes, a fresh prefill and a chunk continuing cached context."""
    backend = (
        torch_ref.paged_attention if device_backend == "torch" else get_backend(torch.device("cpu")).paged_attention
    )
    heads, kv_heads, d, bs = 4, 2, 32, 16
    ctx = [20, 35, 12, 40]  # decode, decode, prefill from 0 (12 tokens), chunk 30..40
    k_cache, v_cache, tables, dense = random_paged(ctx, kv_heads, d, bs, seed=2)
    q_lens = [1, 1, 12, 10]
    total = sum(q_lens)
    q = torch.randn(total, heads, d)
    # The new tokens' keys/values are the tail of each sequence's dense K/V.
    key = torch.cat([dense[i][0][ctx[i] - q_lens[i] :] for i in range(4)])
    value = torch.cat([dense[i][1][ctx[i] - q_lens[i] :] for i in range(4)])
    meta = AttentionMetadata(
        bs,
        torch.zeros(total, dtype=torch.long),
        2,
        tables[:2],
        torch.tensor(ctx[:2]),
        [(2, 12, 12), (14, 10, 40)],
        tables[2:],
    )
    out = backend(q, key, value, k_cache, v_cache, meta, 0.2)
    # With a bfloat16 cache (written by this backend's write_kv), the decodes and the continued chunk
    # read rounded keys and values: same as the torch reference over the same cache, close to float32.
    k16, v16 = torch.zeros_like(k_cache, dtype=torch.bfloat16), torch.zeros_like(v_cache, dtype=torch.bfloat16)
    kernels = get_backend(torch.device("cpu")) if device_backend == "default" else torch_ref
    for i in range(4):
        table = tables[i, : -(-ctx[i] // bs)]
        slots = torch.cat([torch.arange(b * bs, (b + 1) * bs) for b in table])[: ctx[i]]
        kernels.write_kv(dense[i][0], dense[i][1], k16, v16, slots)
    out16 = backend(q, key, value, k16, v16, meta, 0.2)
    want16 = torch_ref.paged_attention(q, key, value, k16, v16, meta, 0.2)
    torch.testing.assert_close(out16, want16, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out16, out, rtol=0, atol=0.05)
    assert not torch.equal(out16[:2], out[:2])  # the decodes did read the rounded cache
    row = 0
    for i in range(4):
        for j in range(q_lens[i]):
            pos = ctx[i] - q_lens[i] + j
            k, v = dense[i][0][: pos + 1], dense[i][1][: pos + 1]
            torch.testing.assert_close(out[row], dense_attention(q[row], k, v, 0.2), rtol=1e-4, atol=1e-5)
            row += 1


def test_write_kv_places_tokens_at_their_slots():
    k_cache = torch.zeros(4, 2, 4, 8)  # 4 blocks of 8 slots, 2 heads of size 4
    v_cache = torch.zeros(4, 2, 8, 4)
    key, value = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    torch_ref.write_kv(key, value, k_cache, v_cache, torch.tensor([5, 17, 30]))
    assert torch.equal(k_cache[2, :, :, 1], key[1]) and torch.equal(v_cache[3, :, 6, :], value[2])
    table = torch.tensor([[0, 2]])
    assert torch.equal(torch_ref.gather_keys(k_cache, table)[0, 9], key[1])
    assert torch.equal(torch_ref.gather_values(v_cache, table)[0, 9], value[1])
    assert torch.equal(torch_ref.gather_values(v_cache, torch.tensor([[3]]))[0, 6], value[2])
    assert k_cache[1].abs().sum() == 0 and v_cache[1].abs().sum() == 0  # block 1 holds none of the slots


@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_cpu_write_kv_matches_torch_reference(tokens, cache_dtype):
    ops = load_cpu_ops()
    if ops is None:
        pytest.skip("C++ CPU kernels unavailable")
    g = torch.Generator().manual_seed(tokens)
    blocks, kv_heads, head_size, block_size = 40, 3, 64, 16
    slots = torch.randperm(blocks * block_size, generator=g)[:tokens]
    # Keys and values as the model hands them over: column slices of one fused qkv projection.
    qkv = torch.randn(tokens, 5 * kv_heads * head_size, generator=g)
    key = qkv[:, 3 * kv_heads * head_size : 4 * kv_heads * head_size].view(tokens, kv_heads, head_size)
    value = qkv[:, 4 * kv_heads * head_size :].view(tokens, kv_heads, head_size)
    want_k, want_v = (
        torch.randn(blocks, kv_heads, head_size, block_size).to(cache_dtype),
        torch.randn(blocks, kv_heads, block_size, head_size).to(cache_dtype),
    )
    got_k, got_v = want_k.clone(), want_v.clone()
    torch_ref.write_kv(key, value, want_k, want_v, slots)
    ops.write_kv(key, value, got_k, got_v, slots.to(torch.int32))
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.write_kv(key[:1], value[:1], got_k, got_v, torch.tensor([blocks * block_size]))


def _causal_reference(q, k, v, scale):
    """torch_ref's SDPA path: q [Lq, H, D] at the last Lq positions of k/v [Lk, kvH, D], causal."""
    return torch_ref._causal_attention(q, k, v, k.shape[0] - q.shape[0], scale)


# Lengths around the kernel's 6-row tiles, 16-key panels and 64-key softmax steps, with and without
# cached context before the chunk; q, k and v are views into one fused qkv row (as the model's
# projections hand them over), out a view too.
@pytest.mark.parametrize("length", [1, 5, 6, 17, 64, 65, 131, 300])
@pytest.mark.parametrize("cached", [0, 37])
@pytest.mark.parametrize("heads,kv_heads,head_size", [(9, 3, 64), (4, 4, 16), (8, 2, 128), (6, 1, 32)])
def test_cpu_prefill_attention_matches_sdpa(length, cached, heads, kv_heads, head_size):
    ops = load_cpu_ops()
    if ops is None or not ops.prefill_attention_supported(head_size):
        pytest.skip("no C++ prefill attention in this build: SDPA is used")
    g = torch.Generator().manual_seed(length * 7 + heads + cached)
    keys = cached + length
    width = (heads + 2 * kv_heads) * head_size
    qkv = torch.randn(keys, width, generator=g) * 2
    q = qkv[cached:, : heads * head_size].view(length, heads, head_size)
    k = qkv[:, heads * head_size : (heads + kv_heads) * head_size].view(keys, kv_heads, head_size)
    v = qkv[:, (heads + kv_heads) * head_size :].view(keys, kv_heads, head_size)
    out = torch.full((length + 3, heads, head_size), float("nan"))
    ops.prefill_attention(q, k, v, out[2 : 2 + length], head_size**-0.5)
    # As accurate as SDPA: both against the float64 result (summation orders differ, so not bit for bit).
    exact = _causal_reference(q.double(), k.double(), v.double(), head_size**-0.5)
    sdpa_error = (_causal_reference(q, k, v, head_size**-0.5).double() - exact).abs().max().item()
    assert (out[2 : 2 + length].double() - exact).abs().max().item() <= max(2 * sdpa_error, 1e-5)
    assert out[:2].isnan().all() and out[2 + length :].isnan().all()  # nothing written outside out's rows


def test_cpu_prefill_attention_refuses_what_it_cannot_compute():
    ops = load_cpu_ops()
    if ops is None or not ops.prefill_attention_supported(64):
        pytest.skip("no C++ prefill attention in this build: SDPA is used")
    assert not ops.prefill_attention_supported(40) and not ops.prefill_attention_supported(512)
    q, k = torch.randn(5, 4, 40), torch.randn(5, 2, 40)
    with pytest.raises(RuntimeError, match="head size"):
        ops.prefill_attention(q, k, k, torch.empty_like(q), 0.1)
    q, k = torch.randn(5, 3, 64), torch.randn(5, 2, 64)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        ops.prefill_attention(q, k, k, torch.empty_like(q), 0.1)
    q = torch.randn(5, 4, 64).transpose(0, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.prefill_attention(q, q, q, torch.empty(4, 5, 64), 0.1)
    q, k = torch.randn(5, 4, 64), torch.randn(4, 2, 64)
    with pytest.raises(RuntimeError, match="do not match"):  # fewer keys than queries
        ops.prefill_attention(q, k, k, torch.empty_like(q), 0.1)
    # The backend computes such prompts with SDPA instead: head size 40, a fresh 9-token prompt.
    meta = AttentionMetadata(16, torch.zeros(9, dtype=torch.long), 0, None, None, [(0, 9, 9)], None)
    q, k, v = torch.randn(9, 4, 40), torch.randn(9, 2, 40), torch.randn(9, 2, 40)
    cache = torch.zeros(1, 2, 40, 16)
    out = get_backend(torch.device("cpu")).paged_attention(q, k, v, cache, cache, meta, 0.2)
    torch.testing.assert_close(out, _causal_reference(q, k, v, 0.2), rtol=1e-5, atol=1e-6)

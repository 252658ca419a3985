"""Block pool and KV cache manager: allocation, freeing, prefix-cache hits and LRU eviction."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvloom.engine.kv_cache.block_pool import BlockPool
from kvloom.engine.kv_cache.manager import KVCacheManager, hash_block
from kvloom.engine.request import Request
from kvloom.engine.sampling_params import SamplingParams


def req(rid: str, tokens: list[int], lora_id: int = 0) -> Request:
    return Request(rid, tokens, SamplingParams(), eos_token_id=None, max_tokens=16, lora_id=lora_id)


def test_pool_allocates_and_frees():
    pool = BlockPool(5)
    assert pool.num_free_blocks == 4  # block 0 is the null block
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [1, 2, 3]
    assert pool.get_new_blocks(2) is None
    assert pool.num_free_blocks == 1
    pool.free_blocks(blocks)
    assert pool.num_free_blocks == 4
    assert all(b.ref_cnt == 0 for b in blocks)


def test_allocate_slots_grows_block_table_per_16_tokens():
    kv = KVCacheManager(num_blocks=10, block_size=16)
    r = req("a", list(range(20)))
    assert len(kv.allocate_slots(r, 20)) == 2
    r.num_computed_tokens = 20
    assert kv.allocate_slots(r, 12) == []  # still fits in block 2 (32 slots)
    assert len(kv.allocate_slots(r, 13)) == 1
    kv.free(r)
    assert kv.num_free_blocks == 9


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=16)
    r = req("a", list(range(64)))
    assert kv.allocate_slots(r, 64) is None
    assert kv.num_free_blocks == 3
    assert "a" not in kv.req_blocks


def test_prefix_hits_are_full_blocks_and_leave_last_token():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    a = req("a", list(range(10)))
    kv.allocate_slots(a, 10)
    kv.free(a)
    b = req("b", list(range(10)) + [99])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and len(hits) == 2  # blocks [0..3], [4..7]; [8, 9] was never full
    # A prompt that is exactly cached still computes its last token.
    c = req("c", list(range(8)))
    hits, n = kv.get_computed_blocks(c)
    assert n == 4


def test_lora_id_changes_block_hashes():
    assert hash_block(b"", [1, 2, 3], 0) != hash_block(b"", [1, 2, 3], 1)
    kv = KVCacheManager(num_blocks=20, block_size=4)
    a = req("a", list(range(12)), lora_id=1)
    kv.allocate_slots(a, 12)
    kv.free(a)
    assert kv.get_computed_blocks(req("b", list(range(12)), lora_id=2))[1] == 0
    assert kv.get_computed_blocks(req("c", list(range(12)), lora_id=1))[1] == 8


def test_lru_eviction_drops_oldest_cached_blocks_first():
    kv = KVCacheManager(num_blocks=5, block_size=4)  # 4 usable blocks
    a, b = req("a", [1] * 8), req("b", [2] * 8)
    for r in (a, b):
        kv.allocate_slots(r, 8)
    kv.free(a)
    kv.free(b)
    # One new block must evict; a's blocks were freed first, so they go first.
    c = req("c", [3] * 4)
    kv.allocate_slots(c, 4)
    assert kv.get_computed_blocks(req("a2", [1] * 8 + [0]))[1] == 4
    assert kv.get_computed_blocks(req("b2", [2] * 8 + [0]))[1] == 8


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["alloc", "grow", "free"]), st.integers(0, 5), st.integers(1, 40)), max_size=60)
)
def test_random_operations_never_leak_or_double_free(ops):
    kv = KVCacheManager(num_blocks=12, block_size=4)
    live: dict[int, Request] = {}
    for op, slot, n in ops:
        r = live.get(slot)
        if op == "alloc" and r is None:
            r = req(f"r{slot}", [slot] * n)
            hits, computed = kv.get_computed_blocks(r)
            if kv.allocate_slots(r, r.num_tokens - computed, hits) is not None:
                r.num_computed_tokens = r.num_tokens
                live[slot] = r
        elif op == "grow" and r is not None:
            for _ in range(n % 6):
                r.append_output_token(slot)
            if kv.allocate_slots(r, r.num_tokens - r.num_computed_tokens) is not None:
                r.num_computed_tokens = r.num_tokens
        elif op == "free" and r is not None:
            kv.free(live.pop(slot))
        held = sum(len(b) for b in kv.req_blocks.values())
        in_use = sum(1 for b in kv.pool.blocks[1:] if b.ref_cnt > 0)
        assert in_use + kv.num_free_blocks == kv.pool.num_usable_blocks
        assert held >= in_use
        assert all(b.ref_cnt >= 0 for b in kv.pool.blocks)
    for r in live.values():
        kv.free(r)
    assert kv.num_free_blocks == kv.pool.num_usable_blocks

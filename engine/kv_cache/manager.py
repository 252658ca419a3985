"""KV cache manager: per-request block tables over the block pool, with automatic prefix caching."""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from kvloom.engine.kv_cache.block_pool import BlockPool, KVBlock
from kvloom.engine.request import Request


def hash_block(parent_hash: bytes, token_ids: list[int], extra_key: int = 0) -> bytes:
    """Chained block hash: the parent's hash, this block's tokens and an extra key (the LoRA id)."""
    h = hashlib.sha256(parent_hash)
    h.update(array("q", token_ids).tobytes())
    h.update(extra_key.to_bytes(8, "little", signed=True))
    return h.digest()


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups counted in prompt tokens (vLLM's prefix_cache_queries / _hits)."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    """Allocates, shares and frees the blocks of each request; pure Python, no tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    # ---- queries -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_usable_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request (a block shared by several counts once)."""
        return self.pool.num_usable_blocks - self.pool.num_free_blocks

    def num_unfilled_slots(self, requests: list[Request]) -> int:
        """Allocated slots that hold no computed token. Only a request's tail block can be partly
        empty; shared blocks are always full, so summing per request counts no slot twice."""
        bs = self.block_size
        return sum(
            len(self.req_blocks.get(r.request_id, ())) * bs - r.num_computed_tokens
            for r in requests
            if r.request_id in self.req_blocks
        )

    # ---- prefix cache ------------------------------------------------------------------------
    def _update_block_hashes(self, request: Request, num_tokens: int) -> None:
        """Extend request.block_hashes to cover every full block among its first num_tokens tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[i - 1] if i else b""
            hashes.append(hash_block(parent, tokens[i * bs : (i + 1) * bs], request.lora_id))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest run of cached full blocks that prefixes the request, and its token count.

        The last token is always left to compute so the step produces logits for it.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        self._update_block_hashes(request, request.num_tokens)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count a first-time prompt lookup once it is scheduled (retries and resumptions excluded)."""
        if self.enable_caching and request.num_preemptions == 0:
            self.stats.queries += request.num_tokens
            self.stats.hits += num_hit_tokens

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    # ---- allocation --------------------------------------------------------------------------
    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVBlock] | None = None
    ) -> list[KVBlock] | None:
        """Give the request room for num_new_tokens more tokens after its computed ones.

        new_computed_blocks are prefix-cache hits taken on first scheduling. Returns the newly
        allocated blocks, or None (changing nothing) when the pool is short.
        """
        computed = new_computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed) * self.block_size
        total_tokens = num_computed + num_new_tokens
        num_needed = -(-total_tokens // self.block_size) - len(blocks) - len(computed)
        # Hits that sit in the free queue leave it when touched, so they count against the free blocks.
        num_revived = sum(1 for b in computed if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_revived:
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        self.pool.touch(computed)
        blocks.extend(computed)
        new_blocks = self.pool.get_new_blocks(max(num_needed, 0)) or []
        blocks.extend(new_blocks)
        if self.enable_caching:
            self._cache_full_blocks(request, blocks, min(total_tokens, request.num_tokens))
        return new_blocks

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        """Register blocks whose tokens are all known (their KV is written in this step)."""
        num_full = num_tokens // self.block_size
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._update_block_hashes(request, num_tokens)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release all blocks of a finished, aborted or preempted request."""
        blocks = self.req_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(list(reversed(blocks)))

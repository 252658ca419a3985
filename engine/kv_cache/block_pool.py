"""Block pool: KV blocks with reference counts, an LRU free queue and the prefix-cache hash table."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVBlock:
    """One block of `block_size` KV slots in every layer's cache."""

    block_id: int
    ref_cnt: int = 0
    # Set once the block is full and its content is known, so other requests can reuse it.
    block_hash: bytes | None = None


class BlockPool:
    """Owns every block. Block 0 is the null block: padding in block tables, never allocated.

    Free blocks sit in an LRU queue (oldest first). A free block may still hold cached content
    (it keeps its hash); allocation takes from the front and drops that hash, so the least
    recently used cached prefix is the one evicted. A block with ref_cnt > 0 is never evicted.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        assert num_blocks >= 2, "need the null block and at least one usable block"
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self.cached: dict[bytes, KVBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, including evictable cached ones)."""
        return len(self._free)

    def get_new_blocks(self, num: int) -> list[KVBlock] | None:
        """Take `num` blocks off the free queue (evicting their cached content), or None if short."""
        if num > len(self._free):
            return None
        out = []
        for _ in range(num):
            _, block = self._free.popitem(last=False)
            self._drop_hash(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        return self.cached.get(block_hash)

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on blocks found in the prefix cache (reviving free ones)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: list[KVBlock]) -> None:
        """Drop one reference on each block; blocks reaching zero join the tail of the LRU queue.

        Callers pass a request's blocks in reverse so its tail blocks, the least likely to be
        shared, are evicted before its head.
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} freed more often than allocated"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None or not self.enable_caching:
                    self._drop_hash(block)
                    # Uncached blocks are the cheapest to reuse: put them first in line.
                    self._free[block.block_id] = block
                    self._free.move_to_end(block.block_id, last=False)
                else:
                    self._free[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Record that `block` holds the full block identified by `block_hash`."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            # Another block already holds the same content; keep the first, this one stays private.
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if len(self._free) != self.num_usable_blocks:
            return False
        for block in self.blocks[1:]:
            block.block_hash = None
        self.cached.clear()
        return True

    def _drop_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

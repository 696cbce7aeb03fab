"""Prefix caching over one slab allocator: content-addressed, reference-counted full blocks.

Pure Python. A *full* KV block of a model is identified by its content: the model, the
block's tokens and the block before it (a chain, so a block matches only after the same
prefix). The key holds the tokens themselves and the parent's node id, so two different
prefixes never collide. Identity is per model (weights + KV format): never shared between
models or precisions.

Lifecycle of a physical block:
  private      allocated to one request, not (yet) in the cache; freed when the request
               lets go.
  cached       registered once full and computed (never while being written); shared by
               every request that maps it; reference-counted.
  idle         cached with no references: kept for later hits, evictable, in LRU order.
Eviction cooperates with slabs: first whole slabs whose live blocks are all idle (the slab
goes back to the common pool for any format), then idle blocks of the size being asked
for, then the least recently used idle block of any size.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Dict, List, Sequence, Tuple

from fineserve_jax.kvslab.allocator import SlabAllocator

Key = Tuple[str, int, Tuple[int, ...]]  # (model, parent node id, the block's tokens)


class CachedBlock:
    __slots__ = ("id", "key", "block_bytes", "block_id", "refs", "idle_since")

    def __init__(self, id: int, key: Key, block_bytes: int, block_id: int):
        self.id, self.key, self.block_bytes, self.block_id = id, key, block_bytes, block_id
        self.refs = 1  # the request that wrote it
        self.idle_since = 0  # release counter when it last became idle (LRU across sizes)


@dataclasses.dataclass
class PrefixCacheStats:
    queries: int = 0  # admissions that looked the cache up
    hit_blocks: int = 0
    hit_tokens: int = 0  # tokens not prefilled thanks to hits (re-admissions included)
    registered_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """The cached blocks of one KV pool (a `SlabAllocator`)."""

    ROOT = 0  # the parent id of a sequence's first block

    def __init__(self, alloc: SlabAllocator):
        self.alloc = alloc
        self._by_key: Dict[Key, CachedBlock] = {}
        self._by_block: Dict[Tuple[int, int], CachedBlock] = {}
        # Idle blocks per size, least recently used first; and idle counts per slab.
        self._idle: Dict[int, "collections.OrderedDict[int, CachedBlock]"] = {}
        # Idle blocks per (block bytes, slab), and the slabs last seen holding only idle
        # blocks (re-checked when used: allocations elsewhere may have changed them).
        self._idle_in_slab: Dict[Tuple[int, int], Dict[int, CachedBlock]] = {}
        self._all_idle: set = set()
        self._ids = itertools.count(1)
        self._releases = 0
        self.stats = PrefixCacheStats()

    # -- lookups ----------------------------------------------------------------------------
    def match(self, model: str, blocks: Sequence[Tuple[int, ...]]) -> List[CachedBlock]:
        """The cached blocks of the longest cached prefix of `blocks` (full blocks' tokens,
        in order). Nothing is acquired."""
        return self.match_from(model, self.ROOT, blocks)

    def match_from(self, model: str, parent: int, blocks: Sequence[Tuple[int, ...]]) -> List[CachedBlock]:
        """Like `match`, continuing a chain after the cached block `parent`."""
        out = []
        for tokens in blocks:
            b = self._by_key.get((model, parent, tokens))
            if b is None:
                break
            out.append(b)
            parent = b.id
        return out

    def is_cached(self, block_bytes: int, block_id: int) -> bool:
        return (block_bytes, block_id) in self._by_block

    @property
    def idle_bytes(self) -> int:
        return sum(b * len(d) for b, d in self._idle.items())

    @property
    def idle_blocks(self) -> int:
        return sum(len(d) for d in self._idle.values())

    @property
    def num_cached(self) -> int:
        return len(self._by_block)

    def refs(self, block_bytes: int, block_id: int) -> int:
        b = self._by_block.get((block_bytes, block_id))
        return 0 if b is None else b.refs

    # -- references ---------------------------------------------------------------------------
    def _slab_idle(self, b: CachedBlock, idle: bool) -> None:
        slab = self._slab(b)
        blocks = self._idle_in_slab.get(slab)
        if idle:
            if blocks is None:
                blocks = self._idle_in_slab[slab] = {}
            blocks[b.block_id] = b
        else:
            del blocks[b.block_id]
            if not blocks:
                del self._idle_in_slab[slab]
        self.check_slab(*slab)

    def check_slab(self, block_bytes: int, slab: int) -> None:
        """Note whether a slab holds idle blocks only (call after its live count changed)."""
        blocks = self._idle_in_slab.get((block_bytes, slab))
        if blocks and len(blocks) == self.alloc.live_in_slab(slab):
            self._all_idle.add((block_bytes, slab))
        else:
            self._all_idle.discard((block_bytes, slab))

    def acquire(self, block: CachedBlock) -> None:
        if block.refs == 0:
            self._idle[block.block_bytes].pop(block.block_id)
            self._slab_idle(block, False)
        block.refs += 1

    def release(self, block_bytes: int, block_id: int) -> bool:
        """A request lets go of a block: True if the cache keeps it (the caller must not free
        it), False if it is private (the caller frees it)."""
        b = self._by_block.get((block_bytes, block_id))
        if b is None:
            return False
        b.refs -= 1
        if b.refs == 0:
            self._releases += 1
            b.idle_since = self._releases
            self._idle.setdefault(block_bytes, collections.OrderedDict())[block_id] = b
            self._slab_idle(b, True)
        return True

    def register(self, model: str, parent: int, tokens: Tuple[int, ...], block_bytes: int,
                 block_id: int) -> int:
        """A request's block is full and its KV computed: cache it (with the one reference
        of that request). If the same content is cached already, the request's block stays
        private. Returns the node id that continues the chain."""
        key = (model, parent, tokens)
        b = self._by_key.get(key)
        if b is not None:
            return b.id
        b = CachedBlock(next(self._ids), key, block_bytes, block_id)
        self._by_key[key] = b
        self._by_block[(block_bytes, block_id)] = b
        self.stats.registered_blocks += 1
        return b.id

    # -- eviction -------------------------------------------------------------------------------
    def _slab(self, b: CachedBlock) -> Tuple[int, int]:
        return b.block_bytes, b.block_id // self.alloc.blocks_per_slab(b.block_bytes)

    def _drop(self, b: CachedBlock) -> None:
        del self._by_key[b.key]
        del self._by_block[(b.block_bytes, b.block_id)]

    def evict(self, block_bytes: int, n: int = 1) -> List[Tuple[int, List[int]]]:
        """Free idle blocks to make room for `n` blocks of `block_bytes`: a whole slab of
        idle blocks if there is one, else up to `n` idle blocks of that size (least recently
        used first), else the least recently used idle block. Returns the (block bytes, ids)
        freed (empty: nothing idle)."""
        slab = None
        while self._all_idle and slab is None:
            cand = self._all_idle.pop()
            blocks = self._idle_in_slab.get(cand)
            if blocks and len(blocks) == self.alloc.live_in_slab(cand[1]):
                slab = cand
        if slab is not None:
            victims = list(self._idle_in_slab[slab].values())
        elif self._idle.get(block_bytes):
            victims = list(itertools.islice(self._idle[block_bytes].values(), n))
        else:
            # Least recently used over every size: each size's head is its oldest.
            heads = [next(iter(d.values())) for d in self._idle.values() if d]
            if not heads:
                return []
            victims = [min(heads, key=lambda v: v.idle_since)]
        b = victims[0].block_bytes
        ids = []
        for v in victims:
            del self._idle[b][v.block_id]
            self._slab_idle(v, False)
            self._drop(v)
            ids.append(v.block_id)
        self.alloc.free(b, ids)
        for v in victims[:1] if slab is not None else victims:  # their slabs' counts changed
            self.check_slab(b, v.block_id // self.alloc.blocks_per_slab(b))
        self.stats.evicted_blocks += len(ids)
        return [(b, ids)]

    def clear(self) -> List[Tuple[int, List[int]]]:
        """Forget every cached block (the device lost the KV): idle blocks are freed, blocks
        still referenced become private to their requests."""
        freed = [(b, list(d)) for b, d in self._idle.items() if d]
        for b, ids in freed:
            self.alloc.free(b, ids)
        self._by_key.clear()
        self._by_block.clear()
        self._idle.clear()
        self._idle_in_slab.clear()
        self._all_idle.clear()
        return freed

    def relocate(self, block_bytes: int, id_map: Dict[int, int]) -> None:
        """Compaction moved blocks `src -> dst` (the allocator already knows)."""
        moved = [(s, self._by_block.pop((block_bytes, s))) for s in id_map
                 if (block_bytes, s) in self._by_block]
        idle = self._idle.get(block_bytes)
        for src, b in moved:
            was_idle = idle is not None and src in idle
            if was_idle:
                self._slab_idle(b, False)
            b.block_id = id_map[src]
            self._by_block[(block_bytes, b.block_id)] = b
            if was_idle:
                self._slab_idle(b, True)
        if idle and moved:  # keep LRU order, with the new ids
            self._idle[block_bytes] = collections.OrderedDict(
                (id_map.get(i, i), b) for i, b in idle.items())
        self.freed(block_bytes, list(id_map) + list(id_map.values()))  # live counts moved

    def freed(self, block_bytes: int, block_ids: Sequence[int]) -> None:
        """Private blocks of these ids were freed (or moved): their slabs may now hold idle
        cached blocks only."""
        per = self.alloc.blocks_per_slab(block_bytes)
        for slab in {i // per for i in block_ids}:
            self.check_slab(block_bytes, slab)

"""KV slab compaction, host side: plan block moves, apply them to the allocator, rewrite
block tables (pure Python + numpy; the device copy lives in `kvslab/arena.py`).

Slabs of a block size that hold few live blocks cannot be given to another format until
their last block is freed. Compaction moves the live blocks of the sparsest slabs into the
free blocks of the densest slabs of the same size, so the sparse slabs empty and return to
the free list. A block's bytes must be copied on the device *before* the block tables that
point at it are rewritten, and nothing may allocate in between planning and applying.

Protocol:
    plan = plan_compaction(alloc)                     # pure: alloc unchanged
    arena = copy_blocks(arena, plan.moves)            # device (reference: copy_blocks_numpy)
    freed = apply_compaction(alloc, plan)             # src free, dst live, empty slabs freed
    tables = rewrite_block_tables(tables, plan.id_map(B))   # per block size B
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from fineserve_jax.kvslab.allocator import SlabAllocator, block_byte_offset


@dataclasses.dataclass(frozen=True)
class BlockMove:
    """Copy block `src` to free block `dst` (both ids of size `block_bytes`)."""

    src: int
    dst: int
    block_bytes: int


@dataclasses.dataclass(frozen=True)
class CompactionPlan:
    """Moves that empty `freed_slabs`; valid only for the allocator state it was planned on."""

    moves: Tuple[BlockMove, ...]
    freed_slabs: Tuple[int, ...]
    slab_bytes: int

    @property
    def num_moves(self) -> int:
        return len(self.moves)

    @property
    def moved_bytes(self) -> int:
        return sum(m.block_bytes for m in self.moves)

    @property
    def block_sizes(self) -> Tuple[int, ...]:
        return tuple(sorted({m.block_bytes for m in self.moves}))

    def id_map(self, block_bytes: Optional[int] = None) -> Dict[int, int]:
        """{src id: dst id} of one block size (ids of different sizes are different spaces).

        `block_bytes` may be omitted when the plan moves blocks of one size only.
        """
        sizes = self.block_sizes
        if block_bytes is None:
            if len(sizes) > 1:
                raise ValueError(f"plan moves blocks of several sizes {sizes}: pass block_bytes")
            block_bytes = sizes[0] if sizes else 0
        return {m.src: m.dst for m in self.moves if m.block_bytes == block_bytes}


def plan_compaction(
    alloc: SlabAllocator, block_bytes: Optional[int] = None, max_moves: Optional[int] = None
) -> CompactionPlan:
    """Plan moves that empty the sparsest slabs of each block size (or of one size).

    For a size with L live blocks in k slabs of P blocks each, only ceil(L / P) slabs are
    needed; the densest of them are kept and the others evacuated, sparsest first, so each
    freed slab costs as few moves as possible. A slab is evacuated whole or not at all
    (moving part of a slab frees nothing). With `max_moves`, the sparsest slabs that fit in
    the budget are evacuated (sizes in ascending order share the budget).
    Destinations fill the densest kept slabs first.

    Returns a plan; the allocator is not changed.
    """
    if max_moves is not None and max_moves < 0:
        raise ValueError(f"max_moves must be >= 0, got {max_moves}")
    sizes = alloc.formats if block_bytes is None else (int(block_bytes),)
    budget = max_moves
    moves: List[BlockMove] = []
    freed: List[int] = []
    for b in sizes:
        counts = alloc.slabs_of(b)  # {slab: live}
        if len(counts) < 2:
            continue
        per_slab = alloc.blocks_per_slab(b)
        live = sum(counts.values())
        keep_n = -(-live // per_slab)
        # Densest first; ties by slab id so the plan is deterministic.
        order = sorted(counts, key=lambda s: (-counts[s], s))
        keep, evac = order[:keep_n], order[keep_n:]
        evac.reverse()  # sparsest first
        chosen = []
        for s in evac:
            if budget is not None and counts[s] > budget:
                break
            chosen.append(s)
            if budget is not None:
                budget -= counts[s]
        if not chosen:
            continue
        holes = (d for s in keep for d in alloc.slab_block_ids(s, live=False))
        for s in chosen:
            for src in alloc.slab_block_ids(s, live=True):
                moves.append(BlockMove(src, next(holes), b))
        freed.extend(chosen)
    return CompactionPlan(tuple(moves), tuple(sorted(freed)), alloc.slab_bytes)


def apply_compaction(alloc: SlabAllocator, plan: CompactionPlan) -> List[int]:
    """Apply a plan's bookkeeping to the allocator: dst blocks live, src blocks free.

    Per block size all or nothing (a stale plan raises ValueError before changing that
    size). Returns the slabs that went back to the free list (== plan.freed_slabs unless the
    plan is stale in a harmless way, e.g. a block was allocated in a source slab since).
    """
    if plan.slab_bytes != alloc.slab_bytes:
        raise ValueError(
            f"plan made for slabs of {plan.slab_bytes} B, allocator has {alloc.slab_bytes} B"
        )
    released: List[int] = []
    for b in plan.block_sizes:
        released += alloc.relocate(b, [(m.src, m.dst) for m in plan.moves if m.block_bytes == b])
    return sorted(released)


def rewrite_block_tables(tables: Mapping, id_map: Mapping[int, int]) -> dict:
    """Return new block tables with moved ids replaced: {owner: list[int] | np.ndarray}.

    All tables must hold ids of the block size `id_map` was made for. Ids not in the map
    (including padding entries) are kept. Types are preserved; inputs are not modified.
    """
    if not id_map:
        return {k: (v.copy() if isinstance(v, np.ndarray) else list(v)) for k, v in tables.items()}
    keys = np.fromiter(id_map.keys(), dtype=np.int64, count=len(id_map))
    vals = np.fromiter(id_map.values(), dtype=np.int64, count=len(id_map))
    order = np.argsort(keys)
    keys, vals = keys[order], vals[order]
    out = {}
    for owner, table in tables.items():
        if isinstance(table, np.ndarray):
            flat = table.astype(np.int64).ravel()
            pos = np.clip(np.searchsorted(keys, flat), 0, len(keys) - 1)
            hit = keys[pos] == flat
            new = np.where(hit, vals[pos], flat).astype(table.dtype).reshape(table.shape)
            out[owner] = new
        else:
            out[owner] = [id_map.get(int(b), b) for b in table]
    return out


def moves_to_arrays(moves: Sequence[BlockMove]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src ids, dst ids, block bytes), each int64 [num_moves]: the device copy's inputs."""
    src = np.array([m.src for m in moves], dtype=np.int64)
    dst = np.array([m.dst for m in moves], dtype=np.int64)
    size = np.array([m.block_bytes for m in moves], dtype=np.int64)
    return src, dst, size


def copy_blocks_numpy(
    arena_words: np.ndarray,
    moves: Sequence[BlockMove],
    slab_bytes: int,
    poison: Optional[int] = None,
) -> np.ndarray:
    """Reference device copy: return a copy of the flat uint32 arena with every move done.

    arena_words: uint32 [total_bytes // 4]. Each move copies `block_bytes // 4` words from
    `block_byte_offset(src)` to `block_byte_offset(dst)`. Sources and destinations of one
    plan are disjoint (sources live, destinations free), so the order does not matter; all
    reads see the input arena. With `poison`, source blocks are then filled with that word,
    so a reader that still uses an old id reads garbage (tests catch missing rewrites).
    """
    if arena_words.ndim != 1 or arena_words.dtype != np.uint32:
        raise ValueError(f"arena must be flat uint32, got {arena_words.dtype}{arena_words.shape}")
    if slab_bytes % 4:
        raise ValueError(f"slab_bytes {slab_bytes} is not a multiple of 4")
    out = arena_words.copy()
    if not moves:
        return out
    src_idx, dst_idx = [], []
    for m in moves:
        if m.block_bytes % 4:
            raise ValueError(f"block_bytes {m.block_bytes} is not a multiple of 4")
        words = np.arange(m.block_bytes // 4, dtype=np.int64)
        src_idx.append(block_byte_offset(m.src, m.block_bytes, slab_bytes) // 4 + words)
        dst_idx.append(block_byte_offset(m.dst, m.block_bytes, slab_bytes) // 4 + words)
    src = np.concatenate(src_idx)
    dst = np.concatenate(dst_idx)
    out[dst] = arena_words[src]
    if poison is not None:
        out[src] = np.uint32(poison)
    return out

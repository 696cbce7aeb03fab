"""KV slab compaction: plans free slabs, keep every owner's bytes, and wrong plans are caught
by the byte-equality check (numpy reference copy; pure Python, no JAX)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fineserve_jax.kvslab import (
    BlockMove,
    CompactionPlan,
    SlabAllocator,
    apply_compaction,
    block_byte_offset,
    copy_blocks_numpy,
    plan_compaction,
    rewrite_block_tables,
)

POISON = 0xDEADBEEF


def fragmented_state(seed, slab_bytes=96, sizes=(8, 12, 20, 32), num_slabs=48, keep=0.3):
    """An allocator whose slabs were filled by many owners, most of whom then left.

    Returns (alloc, tables {block_bytes: {owner: [ids]}}, arena uint32 words with random
    contents in every live block).
    """
    rng = np.random.default_rng(seed)
    alloc = SlabAllocator(num_slabs=num_slabs, slab_bytes=slab_bytes)
    tables = {b: {} for b in sizes}
    owner = 0
    while True:
        b = sizes[rng.integers(len(sizes))]
        n = int(rng.integers(1, 4))
        if alloc.free_blocks(b) < n:
            break
        tables[b][owner] = alloc.allocate(b, n)
        owner += 1
    for b in sizes:
        for o in list(tables[b]):
            if rng.random() > keep:
                alloc.free(b, tables[b].pop(o))
    arena = rng.integers(0, 2**32, size=alloc.total_bytes // 4, dtype=np.uint32)
    return alloc, tables, arena


def read_owners(arena, tables, slab_bytes):
    """{(block_bytes, owner): bytes of its blocks in table order}."""
    out = {}
    for b, t in tables.items():
        for o, ids in t.items():
            words = [arena[block_byte_offset(i, b, slab_bytes) // 4:][: b // 4] for i in ids]
            out[(b, o)] = np.concatenate(words).tobytes()
    return out


def compact(alloc, tables, arena, plan, copy_moves=None):
    """The full protocol; `copy_moves` lets a test copy something other than the plan."""
    new_arena = copy_blocks_numpy(arena, plan.moves if copy_moves is None else copy_moves,
                                  alloc.slab_bytes, poison=POISON)
    freed = apply_compaction(alloc, plan)
    new_tables = {b: rewrite_block_tables(t, plan.id_map(b)) for b, t in tables.items()}
    return new_arena, new_tables, freed


def live_ids(alloc, b):
    return {i for s in alloc.slabs_of(b) for i in alloc.slab_block_ids(s)}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), slab_bytes=st.sampled_from([96, 100, 120]))
def test_compaction_frees_slabs_and_keeps_bytes(seed, slab_bytes):
    sizes = (8, 12, 20, 32) if slab_bytes != 120 else (8, 12, 24, 40)
    alloc, tables, arena = fragmented_state(seed, slab_bytes, sizes)
    before = read_owners(arena, tables, slab_bytes)
    used, free_slabs = alloc.used_bytes, alloc.free_slabs
    plan = plan_compaction(alloc)
    arena2, tables2, freed = compact(alloc, tables, arena, plan)
    assert freed == list(plan.freed_slabs)
    assert alloc.free_slabs == free_slabs + len(freed)
    assert alloc.used_bytes == used
    assert read_owners(arena2, tables2, slab_bytes) == before
    for b in sizes:
        # Optimal: every size now uses the fewest slabs that can hold its live blocks.
        per = alloc.blocks_per_slab(b)
        assert len(alloc.slabs_of(b)) == -(-alloc.live_blocks(b) // per)
        assert live_ids(alloc, b) == {i for ids in tables2[b].values() for i in ids}
    # Compacting again finds nothing to do.
    assert plan_compaction(alloc).num_moves == 0


def test_plan_is_pure_and_prefers_cheap_slabs():
    alloc, tables, arena = fragmented_state(1)
    snap = alloc.stats()
    plan = plan_compaction(alloc)
    assert alloc.stats() == snap, "planning changed the allocator"
    assert plan.num_moves > 0 and plan.freed_slabs
    assert plan.moved_bytes == sum(m.block_bytes for m in plan.moves)
    # Every source slab is emptied entirely, and no destination is in a freed slab.
    freed = set(plan.freed_slabs)
    for m in plan.moves:
        assert alloc.slab_of(m.block_bytes, m.src) in freed
        assert alloc.slab_of(m.block_bytes, m.dst) not in freed
        assert alloc.is_live(m.block_bytes, m.src) and not alloc.is_live(m.block_bytes, m.dst)


def test_max_moves_budget():
    alloc, tables, arena = fragmented_state(2)
    full = plan_compaction(alloc)
    assert full.num_moves > 3
    for budget in (0, 1, 3, full.num_moves - 1):
        plan = plan_compaction(alloc, max_moves=budget)
        assert plan.num_moves <= budget
        assert len(plan.freed_slabs) <= len(full.freed_slabs)
    before = read_owners(arena, tables, alloc.slab_bytes)
    plan = plan_compaction(alloc, max_moves=3)
    arena2, tables2, freed = compact(alloc, tables, arena, plan)
    assert read_owners(arena2, tables2, alloc.slab_bytes) == before
    assert freed == list(plan.freed_slabs)


def test_single_size_plan():
    alloc, tables, arena = fragmented_state(3)
    plan = plan_compaction(alloc, block_bytes=20)
    assert plan.block_sizes in ((20,), ())
    assert plan.id_map() == {m.src: m.dst for m in plan.moves}
    multi = plan_compaction(alloc)
    if len(multi.block_sizes) > 1:
        with pytest.raises(ValueError, match="several sizes"):
            multi.id_map()


def _mutants(plan, alloc):
    """Copy steps that differ from the plan: each must break some owner's bytes."""
    moves = list(plan.moves)
    first = moves[0]
    # A free destination the plan does not use, in a slab of the same size.
    used_dst = {m.dst for m in moves if m.block_bytes == first.block_bytes}
    spare = next(
        i for s in alloc.slabs_of(first.block_bytes)
        for i in alloc.slab_block_ids(s, live=False) if i not in used_dst
    )
    yield "wrong dst", [BlockMove(first.src, spare, first.block_bytes)] + moves[1:]
    yield "missing move", moves[1:]
    same = [m for m in moves if m.block_bytes == first.block_bytes]
    if len(same) > 1:
        a, b = same[0], same[1]
        swapped = [BlockMove(a.src, b.dst, a.block_bytes), BlockMove(b.src, a.dst, b.block_bytes)]
        yield "swapped dsts", swapped + [m for m in moves if m not in (a, b)]


def test_mutated_plans_are_caught_by_byte_check():
    checked = 0
    for seed in range(5):
        alloc0, tables, arena = fragmented_state(seed)
        plan = plan_compaction(alloc0)
        if not plan.moves:
            continue
        before = read_owners(arena, tables, alloc0.slab_bytes)
        for name, bad_moves in _mutants(plan, alloc0):
            alloc, tables_c, arena_c = fragmented_state(seed)  # fresh identical state
            arena2, tables2, _ = compact(alloc, tables_c, arena_c, plan, copy_moves=bad_moves)
            assert read_owners(arena2, tables2, alloc.slab_bytes) != before, name
            checked += 1
        # Forgetting the table rewrite reads poisoned (moved-away) blocks.
        alloc, tables_c, arena_c = fragmented_state(seed)
        arena2, _, _ = compact(alloc, tables_c, arena_c, plan)
        assert read_owners(arena2, tables_c, alloc.slab_bytes) != before, "no rewrite"
    assert checked >= 10


def test_stale_plan_is_rejected():
    alloc, tables, arena = fragmented_state(4)
    plan = plan_compaction(alloc)
    m = plan.moves[0]
    alloc.free(m.block_bytes, [m.src])  # the source is gone since planning
    snap = alloc.stats()
    with pytest.raises(ValueError, match="not live"):
        apply_compaction(alloc, plan)
    assert alloc.stats() == snap
    with pytest.raises(ValueError, match="slabs of"):
        apply_compaction(alloc, CompactionPlan((), (), alloc.slab_bytes + 4))


def test_rewrite_numpy_tables_keeps_padding_shape_and_dtype():
    tables = {"a": np.array([[5, 6, 0, 0], [7, 0, 0, 0]], dtype=np.int32), "b": [6, 9]}
    out = rewrite_block_tables(tables, {6: 11, 7: 12})
    assert out["a"].dtype == np.int32 and out["a"].shape == (2, 4)
    assert out["a"].tolist() == [[5, 11, 0, 0], [12, 0, 0, 0]]
    assert out["b"] == [11, 9]
    assert tables["a"][0, 1] == 6 and tables["b"] == [6, 9]  # inputs untouched
    assert rewrite_block_tables(tables, {})["b"] == [6, 9]


def test_copy_blocks_numpy_offsets_with_tail():
    # 100 B slabs of 24 B blocks (4 per slab, 4 B tail): block 5 = slab 1 index 1 at byte 124.
    arena = np.arange(300 // 4, dtype=np.uint32)
    out = copy_blocks_numpy(arena, [BlockMove(5, 9, 24)], slab_bytes=100, poison=POISON)
    assert out[224 // 4: 248 // 4].tolist() == list(range(31, 37))
    assert (out[124 // 4: 148 // 4] == POISON).all()
    assert arena[31] == 31  # input untouched
    with pytest.raises(ValueError, match="flat uint32"):
        copy_blocks_numpy(arena.astype(np.int64), [], 100)

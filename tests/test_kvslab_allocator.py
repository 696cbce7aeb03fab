"""SlabAllocator: properties against a simple model, explicit semantics, error messages,
and mutants that show the property checker is not vacuous. Pure Python (no JAX)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fineserve_jax.kvslab import OutOfKVMemory, SlabAllocator, block_byte_offset

# Slab size 96 B with blocks that divide it (8, 12, 32) and blocks that leave a tail
# (20 -> 4 blocks + 16 B, 40 -> 2 blocks + 16 B): exercises both id/offset regimes.
SLAB = 96
SIZES = (8, 12, 20, 32, 40)


# --- the reference model and the property checker ----------------------------------------


class Model:
    """What the allocator must look like from outside: live ids per block size."""

    def __init__(self, alloc: SlabAllocator):
        self.alloc = alloc
        self.live = {}  # block_bytes -> set of ids
        self.owners = []  # (block_bytes, [ids]) in allocation order

    def per_slab(self, b):
        return self.alloc.slab_bytes // b

    def slabs(self, b):
        return {i // self.per_slab(b) for i in self.live.get(b, ())}

    def used_slabs(self):
        return set().union(*(self.slabs(b) for b in self.live)) if self.live else set()

    def free_slabs(self):
        return self.alloc.num_slabs - 1 - len(self.used_slabs())

    def free_blocks(self, b):
        p = self.per_slab(b)
        return len(self.slabs(b)) * p - len(self.live.get(b, ())) + self.free_slabs() * p

    def snapshot(self):
        a = self.alloc
        return json.dumps(a.stats(), sort_keys=True), {b: a.slabs_of(b) for b in SIZES}


def check_invariants(alloc: SlabAllocator, model: Model) -> None:
    """Every property the allocator promises, checked against the model (AssertionError)."""
    S = alloc.slab_bytes
    ranges = []
    seen_slabs = {}
    for b, ids in model.live.items():
        p = S // b
        for i in ids:
            slab = i // p
            assert 1 <= slab < alloc.num_slabs, f"block {i} of {b} B in slab {slab}"
            off = block_byte_offset(i, b, S)
            assert slab * S <= off and off + b <= (slab + 1) * S, "block crosses its slab"
            assert alloc.is_live(b, i), f"block {i} of {b} B should be live"
            ranges.append((off, off + b))
            other = seen_slabs.setdefault(slab, b)
            assert other == b, f"slab {slab} holds blocks of {other} B and {b} B"
    ranges.sort()
    for (s0, e0), (s1, e1) in zip(ranges, ranges[1:]):
        assert e0 <= s1, f"live blocks overlap: [{s0},{e0}) and [{s1},{e1})"
    assert alloc.used_bytes == sum(b * len(v) for b, v in model.live.items())
    assert alloc.free_slabs == model.free_slabs(), "free_slabs: emptied slabs not returned?"
    tail = free = 0
    for b in SIZES:
        assert alloc.free_blocks(b) == model.free_blocks(b), f"free_blocks({b})"
        assert alloc.live_blocks(b) == len(model.live.get(b, ()))
        n = len(model.slabs(b))
        tail += n * (S % b)
        free += (n * (S // b) - len(model.live.get(b, ()))) * b
    assert alloc.waste_bytes() == {"slab_tail": tail, "free_in_partial_slabs": free,
                                   "total": tail + free}


def do_allocate(alloc, model, b, n):
    """Allocate through the allocator and check the result against the model."""
    before = model.snapshot()
    expected_ok = n <= model.free_blocks(b)
    p = alloc.slab_bytes // b
    free_in_slabs = len(model.slabs(b)) * p - len(model.live.get(b, ()))
    free_slabs = model.free_slabs()
    try:
        ids = alloc.allocate(block_bytes=b, num_blocks=n)
    except OutOfKVMemory:
        assert not expected_ok, f"allocate({b}, {n}) failed with {model.free_blocks(b)} free"
        assert model.snapshot() == before, "a failed allocation changed the allocator"
        return None
    assert expected_ok, f"allocate({b}, {n}) succeeded with only {model.free_blocks(b)} free"
    assert len(ids) == n and len(set(ids)) == n, "allocate returned duplicate ids"
    live = model.live.setdefault(b, set())
    for i in ids:
        assert i not in live, f"block {i} of {b} B handed out twice"
        live.add(i)
    # Fill partially used slabs first: only the shortfall formats new slabs.
    want_new = max(0, -(-(n - free_in_slabs) // p))
    assert free_slabs - model.free_slabs() == want_new, "did not fill partial slabs first"
    if n:
        model.owners.append((b, list(ids)))
    return ids


def do_free(alloc, model, b, ids):
    alloc.free(block_bytes=b, block_ids=ids)
    model.live[b].difference_update(ids)


def do_invalid_free(alloc, model, rng):
    """A free that must raise ValueError and change nothing."""
    before = model.snapshot()
    kind = rng.integers(4)
    b = SIZES[rng.integers(len(SIZES))]
    live = sorted(model.live.get(b, ()))
    if kind == 0 or not live:  # an id that is not live
        cand = int(rng.integers(0, alloc.num_block_ids(b) + 5))
        if cand in model.live.get(b, ()):
            return
        bad = live[:1] + [cand]
    elif kind == 1:  # duplicate inside one call
        bad = [live[0], live[0]]
    elif kind == 2:  # right id, wrong block size
        others = [o for o in SIZES if o != b]
        wrong = others[rng.integers(len(others))]
        bad = [live[0]]
        if bad[0] in model.live.get(wrong, ()):
            return
        with pytest.raises(ValueError):
            alloc.free(block_bytes=wrong, block_ids=bad)
        assert model.snapshot() == before
        return
    else:  # the null slab
        bad = [0]
    with pytest.raises(ValueError):
        alloc.free(block_bytes=b, block_ids=bad)
    assert model.snapshot() == before, "a rejected free changed the allocator"


def run_random_ops(alloc: SlabAllocator, seed: int, n_ops: int) -> Model:
    """A random allocate/free sequence, every step checked; ends by freeing everything."""
    rng = np.random.default_rng(seed)
    model = Model(alloc)
    sizes = [SIZES[i] for i in rng.choice(len(SIZES), size=rng.integers(1, 4), replace=False)]
    for _ in range(n_ops):
        op = rng.random()
        if op < 0.5 or not model.owners:
            b = sizes[rng.integers(len(sizes))]
            n = int(rng.integers(0, 2 * (alloc.slab_bytes // b) + 2))
            do_allocate(alloc, model, b, n)
        elif op < 0.9:
            b, ids = model.owners.pop(int(rng.integers(len(model.owners))))
            if rng.random() < 0.3 and len(ids) > 1:  # free part of it, keep the rest
                k = int(rng.integers(1, len(ids)))
                part = [ids[i] for i in rng.permutation(len(ids))[:k]]
                do_free(alloc, model, b, part)
                model.owners.append((b, [i for i in ids if i not in part]))
            else:
                do_free(alloc, model, b, ids)
        else:
            do_invalid_free(alloc, model, rng)
        check_invariants(alloc, model)
    while model.owners:
        b, ids = model.owners.pop()
        do_free(alloc, model, b, ids)
        check_invariants(alloc, model)
    assert alloc.free_slabs == alloc.num_slabs - 1
    assert alloc.used_bytes == 0
    return model


# --- property tests --------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), num_slabs=st.integers(1, 12))
def test_random_sequences_keep_all_invariants(seed, num_slabs):
    run_random_ops(SlabAllocator(num_slabs=num_slabs, slab_bytes=SLAB), seed, n_ops=60)


def test_long_random_sequences():
    for seed in range(20):
        run_random_ops(SlabAllocator(num_slabs=8, slab_bytes=SLAB), seed, n_ops=1500)


class AllocatorMachine(RuleBasedStateMachine):
    """Hypothesis-driven op sequences (shrinks to a minimal failing sequence)."""

    @initialize(num_slabs=st.integers(1, 6))
    def setup(self, num_slabs):
        self.alloc = SlabAllocator(num_slabs=num_slabs, slab_bytes=SLAB)
        self.model = Model(self.alloc)

    @rule(b=st.sampled_from(SIZES), n=st.integers(0, 30))
    def allocate(self, b, n):
        do_allocate(self.alloc, self.model, b, n)

    @precondition(lambda self: self.model.owners)
    @rule(k=st.integers(0, 10**6), part=st.booleans())
    def free(self, k, part):
        b, ids = self.model.owners.pop(k % len(self.model.owners))
        if part and len(ids) > 1:
            do_free(self.alloc, self.model, b, ids[::2])
            self.model.owners.append((b, ids[1::2]))
        else:
            do_free(self.alloc, self.model, b, ids)

    @rule(seed=st.integers(0, 2**16))
    def invalid_free(self, seed):
        do_invalid_free(self.alloc, self.model, np.random.default_rng(seed))

    @invariant()
    def consistent(self):
        if hasattr(self, "alloc"):
            check_invariants(self.alloc, self.model)

    def teardown(self):
        if hasattr(self, "alloc"):
            while self.model.owners:
                b, ids = self.model.owners.pop()
                do_free(self.alloc, self.model, b, ids)
            assert self.alloc.free_slabs == self.alloc.num_slabs - 1


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


# --- mutants: the checker must catch each of them --------------------------------------------


class DoubleHandsAnId(SlabAllocator):
    """Every 5th allocation returns an id that is already live."""

    calls = 0

    def allocate(self, block_bytes, num_blocks):
        ids = super().allocate(block_bytes, num_blocks)
        self.calls += 1
        live = [i for s in self.slabs_of(block_bytes) for i in self.slab_block_ids(s)]
        if ids and self.calls % 5 == 0:
            older = [i for i in live if i not in ids]
            if older:
                ids[-1] = older[0]
        return ids


class KeepsEmptySlabs(SlabAllocator):
    """Never returns an emptied slab to the free list."""

    def _release_slab(self, s, fmt):
        pass


class PartialOnFailure(SlabAllocator):
    """Hands out what it can before raising: not all-or-nothing."""

    def allocate(self, block_bytes, num_blocks):
        try:
            return super().allocate(block_bytes, num_blocks)
        except OutOfKVMemory as e:
            if e.free_blocks:
                super().allocate(block_bytes, e.free_blocks)
            raise


class IgnoresPartialSlabs(SlabAllocator):
    """Formats a new slab whenever one is free instead of filling partial slabs."""

    def _fullest_partial(self, fmt):
        return None if self._free_slabs else super()._fullest_partial(fmt)


@pytest.mark.parametrize("mutant", [DoubleHandsAnId, KeepsEmptySlabs, PartialOnFailure,
                                    IgnoresPartialSlabs])
def test_checker_catches_broken_allocators(mutant):
    caught = 0
    for seed in range(10):
        try:
            run_random_ops(mutant(num_slabs=6, slab_bytes=SLAB), seed, n_ops=300)
        except AssertionError:
            caught += 1
    assert caught == 10, f"{mutant.__name__} slipped through {10 - caught}/10 random runs"


# --- explicit semantics ---------------------------------------------------------------------


def test_block_id_layout_and_null_slab():
    a = SlabAllocator(num_slabs=3, slab_bytes=64)
    ids = a.allocate(block_bytes=16, num_blocks=8)
    assert ids == [4, 5, 6, 7, 8, 9, 10, 11]  # slab 1 then slab 2; slab 0 never
    assert [a.slab_of(16, i) for i in ids] == [1] * 4 + [2] * 4
    assert [a.block_byte_offset(16, i) for i in ids] == [i * 16 for i in ids]
    assert a.free_slabs == 0 and a.free_blocks(16) == 0
    with pytest.raises(OutOfKVMemory):
        a.allocate(block_bytes=16, num_blocks=1)


def test_offsets_with_slab_tail():
    # 100 B slabs, 24 B blocks: 4 per slab, 4 B tail; id 5 = slab 1, index 1.
    assert block_byte_offset(5, 24, 100) == 100 + 24
    arr = block_byte_offset(np.array([4, 5, 8]), 24, 100)
    assert arr.tolist() == [100, 124, 200]
    a = SlabAllocator(num_slabs=3, slab_bytes=100)
    ids = a.allocate(block_bytes=24, num_blocks=5)
    assert ids == [4, 5, 6, 7, 8]
    assert a.waste_bytes() == {"slab_tail": 8, "free_in_partial_slabs": 72, "total": 80}
    assert a.num_block_ids(24) == 12


def test_fill_partial_first_prefers_fullest_slab():
    a = SlabAllocator(num_slabs=5, slab_bytes=64)
    x = a.allocate(16, 4)  # slab 1 full
    y = a.allocate(16, 4)  # slab 2 full
    a.free(16, x[:3])  # slab 1: 1 live
    a.free(16, y[:1])  # slab 2: 3 live -> fullest partial
    z = a.allocate(16, 1)
    assert a.slab_of(16, z[0]) == 2
    w = a.allocate(16, 3)  # slab 2 has no room left; then slab 1, no new slab
    assert {a.slab_of(16, i) for i in w} == {1}
    assert a.free_slabs == 2


def test_slab_returns_on_last_free_and_serves_another_size():
    a = SlabAllocator(num_slabs=2, slab_bytes=64)
    ids = a.allocate(16, 3)
    a.free(16, ids[:2])
    assert a.free_slabs == 0 and a.free_blocks(32) == 0
    a.free(16, ids[2:])
    assert a.free_slabs == 1 and a.slabs_of(16) == {}
    assert a.allocate(32, 2) == [2, 3]
    assert a.slab_block_bytes(1) == 32


def test_out_of_memory_message_and_nothing_changes():
    a = SlabAllocator(num_slabs=3, slab_bytes=64)
    a.allocate(16, 5)
    before = json.dumps(a.stats(), sort_keys=True)
    with pytest.raises(OutOfKVMemory) as e:
        a.allocate(block_bytes=16, num_blocks=4)
    msg = str(e.value)
    assert "4 blocks of 16 B (64 B)" in msg and "only 3 such blocks (48 B)" in msg
    assert "0 free slabs" in msg
    assert isinstance(e.value, RuntimeError)
    assert (e.value.requested_blocks, e.value.free_blocks, e.value.free_slabs) == (4, 3, 0)
    assert json.dumps(a.stats(), sort_keys=True) == before


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_slabs"):
        SlabAllocator(num_slabs=0, slab_bytes=64)
    with pytest.raises(ValueError, match="slab_bytes"):
        SlabAllocator(num_slabs=2, slab_bytes=-1)
    with pytest.raises(ValueError, match="num_slabs"):
        SlabAllocator(num_slabs=True, slab_bytes=64)
    a = SlabAllocator(num_slabs=2, slab_bytes=64)
    with pytest.raises(ValueError, match="larger than slab_bytes"):
        a.allocate(block_bytes=65, num_blocks=1)
    with pytest.raises(ValueError, match="block_bytes"):
        a.allocate(block_bytes=0, num_blocks=1)
    with pytest.raises(ValueError, match="block_bytes"):
        a.allocate(block_bytes=16.0, num_blocks=1)
    with pytest.raises(ValueError, match="num_blocks"):
        a.allocate(block_bytes=16, num_blocks=-1)
    assert a.allocate(block_bytes=16, num_blocks=0) == []
    assert a.formats == () and a.free_slabs == 1
    # numpy integers are fine
    assert a.allocate(block_bytes=np.int64(16), num_blocks=np.int32(1)) == [4]
    a.free(np.int64(16), np.array([4]))
    assert a.used_bytes == 0


def test_invalid_frees_raise_and_change_nothing():
    a = SlabAllocator(num_slabs=4, slab_bytes=64)
    ids = a.allocate(16, 2)
    other = a.allocate(32, 1)
    before = json.dumps(a.stats(), sort_keys=True)
    cases = [
        (16, [ids[0], ids[0]], "twice"),
        (16, [ids[0], 7], "already free in slab 1"),
        (16, [0], "null slab"),
        (16, [10_000], "outside the arena"),
        (16, [12], "free slab 3"),
        (16, [other[0] * 2], "formatted for 32 B"),
        (8, [ids[0]], "no blocks of that size"),
    ]
    for b, bad, text in cases:
        with pytest.raises(ValueError, match=text):
            a.free(block_bytes=b, block_ids=bad)
        assert json.dumps(a.stats(), sort_keys=True) == before, (b, bad)
    a.free(16, [])  # freeing nothing is fine
    a.free(16, ids)
    with pytest.raises(ValueError, match="not live"):
        a.free(16, ids)  # double free across calls


def test_introspection_and_stats():
    a = SlabAllocator(num_slabs=4, slab_bytes=96)
    x = a.allocate(32, 2)
    a.allocate(20, 5)
    assert a.num_slabs == 4 and a.slab_bytes == 96 and a.total_bytes == 384
    assert a.formats == (20, 32)
    assert a.is_live(32, x[0]) and not a.is_live(32, 9999) and not a.is_live(24, 0)
    assert a.slabs_of(32) == {1: 2} and a.slabs_of(20) == {2: 4, 3: 1}
    assert a.slab_block_ids(1) == x and a.slab_block_ids(1, live=False) == [5]
    fs = a.format_stats()
    assert fs[20].partial_slabs == 1 and fs[20].slabs == 2 and fs[20].tail_bytes == 16
    assert fs[32].free_blocks_in_slabs == 1
    s = a.stats()
    json.dumps(s)
    assert s["used_bytes"] == 2 * 32 + 5 * 20 and s["reserved_bytes"] == 96
    assert s["waste_bytes"]["slab_tail"] == 2 * 16
    assert "SlabAllocator(" in repr(a)
    with pytest.raises(ValueError, match="outside the arena"):
        a.slab_of(32, 12)


def test_relocate_bookkeeping():
    a = SlabAllocator(num_slabs=4, slab_bytes=64)
    ids = a.allocate(16, 6)  # slab 1 full, slab 2: 2 live
    a.free(16, ids[:2])  # slab 1: 2 live
    released = a.relocate(16, [(ids[4], ids[0]), (ids[5], ids[1])])
    assert released == [2] and a.free_slabs == 2
    assert a.slabs_of(16) == {1: 4}
    with pytest.raises(ValueError, match="is live"):
        a.relocate(16, [(ids[2], ids[3])])
    with pytest.raises(ValueError, match="not formatted"):
        a.relocate(16, [(ids[2], 12)])
    # allocating afterwards still fills correctly
    assert a.allocate(16, 5) == [8, 9, 10, 11, 12]


def test_kvslab_package_does_not_import_jax():
    import subprocess

    code = "import sys, fineserve_jax.kvslab; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

"""Prefix caching over the slab arena, checked against what a device would hold.

`KVOracle` is an executor that keeps, for every block, the (token, position) each slot was
written with, writes each step's new tokens where the block table says, and before every
step checks that each sequence's table covers exactly its own tokens, that no step writes
into a cached (shared) block, and that nothing reads a block after it was freed. The loop,
scheduler, allocator and cache are the real ones; random workloads share prefixes heavily,
memory is tight (eviction, preemption) and compaction runs. (The loop contains a step that
raises, so the oracle records violations instead of raising.)"""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fineserve_jax.core.clock import VirtualClock
from fineserve_jax.core.executor import FixedCostExecutor
from fineserve_jax.core.loop import DeviceLoop, LoopConfig
from fineserve_jax.core.model_entry import ModelEntry, ModelLimits
from fineserve_jax.core.request import Request
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.core.step_plan import StepResult
from fineserve_jax.kvslab import SlabAllocator
from fineserve_jax.kvslab.prefix_cache import PrefixCache
from fineserve_jax.scheduler.local import LocalScheduler, SchedulerConfig
from mock_cost import FixedCost

T = 4
POISON = ("freed",)


class KVOracle(FixedCostExecutor):
    wants_freed_blocks = True

    def __init__(self, sched):
        super().__init__()
        self.sched = sched
        self.kv = {}  # (block bytes, block id) -> {slot: (token, position)}
        self.reads = 0
        self.violations = []

    def check(self, ok, what):
        if not ok:
            self.violations.append(what)

    def run(self, plan, while_running):
        b = self.sched.models[plan.model].block_bytes
        cache = self.sched._cache_of[plan.model] if self.sched._cache_of else None
        tokens = []
        for s, n in zip(plan.seqs, plan.chunks):
            start = s.num_computed
            for p in range(start):  # the cached / computed context this step reads
                got = self.kv.get((b, s.block_ids[p // T]), {}).get(p % T)
                self.check(got == (s.token_slice(p, p + 1)[0], p), ("read", s.request_id, p, got))
                self.reads += 1
            for p in range(start, start + n):  # the new KV this step writes
                blk = s.block_ids[p // T]
                self.check(cache is None or not cache.is_cached(b, blk), ("write into a cached block", blk))
                self.kv.setdefault((b, blk), {})[p % T] = (s.token_slice(p, p + 1)[0], p)
            tokens.append(100 + (s.request_id * 7 + s.num_tokens) % 50)  # depends on the sequence only
        while_running()
        return StepResult(tokens, 1e-3)

    def copy_blocks(self, block_bytes, src, dst):
        saved = [dict(self.kv.get((block_bytes, s), {})) for s in src]
        for d, content in zip(dst, saved):
            self.kv[(block_bytes, d)] = content

    def release_blocks(self, block_bytes, ids):
        for i in ids:
            self.kv[(block_bytes, i)] = {k: POISON for k in range(T)}


def make(num_slabs, caching=True, compaction=4, models=(("a", 64), ("b", 96))):
    entries = {m: ModelEntry(m, "org", bb, T, ModelLimits(48, 4, 6), max_len=128) for m, bb in models}
    alloc = SlabAllocator(num_slabs, 64 * 96 // 32 * 2)
    sched = LocalScheduler(entries, alloc, FixedCost(), SchedulerConfig(admission="fcfs", execution="round_robin",
                                                                       drop=False),
                           track_freed=True, prefix_caching=caching)
    oracle = KVOracle(sched)
    loop = DeviceLoop(sched, oracle, VirtualClock(), config=LoopConfig(compaction_interval=compaction))
    return loop, sched, oracle, alloc


def workload(rng, n, models="ab", prefixes=3):
    """Prompts drawn from a few shared prefixes (of several blocks) plus short tails."""
    heads = {(m, k): [rng.randrange(3, 9) for _ in range(rng.choice([3, 8, 12, 20]))]
             for m in models for k in range(prefixes)}
    reqs, t = [], 0.0
    for i in range(n):
        m = rng.choice(models)
        prompt = list(heads[(m, rng.randrange(prefixes))]) + [rng.randrange(3, 9) for _ in range(rng.randrange(0, 6))]
        t += rng.expovariate(200.0)
        reqs.append(Request(m, prompt, SamplingParams(max_tokens=rng.randrange(1, 14), ignore_eos=True),
                            arrival_s=t, request_id=i))
    return reqs


def check_invariants(sched, alloc):
    """Refcounts = live references; idle = cached without references; every live block is
    either private to exactly one running request or cached."""
    cache: PrefixCache = sched.caches[0]
    refs = {}
    private = {}
    for seqs in sched.running.values():
        for s in seqs:
            b = sched.models[s.model].block_bytes
            for i in s.block_ids:
                if cache.is_cached(b, i):
                    refs[(b, i)] = refs.get((b, i), 0) + 1
                else:
                    assert (b, i) not in private, "a private block in two tables"
                    private[(b, i)] = s.request_id
    for (b, i), blk in cache._by_block.items():
        assert blk.refs == refs.get((b, i), 0), (b, i, blk.refs, refs.get((b, i)))
        assert alloc.is_live(b, i)
    idle = {(b, i) for b, d in cache._idle.items() for i in d}
    assert idle == {k for k, blk in cache._by_block.items() if blk.refs == 0}
    live = sum(alloc.live_blocks(b) for b in alloc.formats)
    assert live == len(private) + len(cache._by_block)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 10**6), st.integers(3, 10), st.sampled_from([0, 1, 5]))
def test_shared_prefixes_read_only_their_own_tokens(seed, num_slabs, compaction):
    rng = random.Random(seed)
    loop, sched, oracle, alloc = make(num_slabs, compaction=compaction)

    def after_each(lp):
        check_invariants(sched, alloc)

    states = loop.run(workload(rng, 40), realtime=True, on_iteration=after_each)
    assert oracle.violations == [] and oracle.reads > 0
    # Everything finishes but requests too long for the whole (tiny) arena, refused at once.
    assert all(s.status.value == "finished" or "arena holds only" in s.error for s in states), \
        [s.error for s in states if s.error]
    assert not sched.has_work
    # Everything still held is idle cache; evicting all of it empties the arena.
    cache = sched.caches[0]
    assert alloc.used_bytes == cache.idle_bytes
    while cache.evict(64) or cache.evict(96):
        pass
    assert alloc.used_bytes == 0 and alloc.free_slabs == alloc.num_slabs - 1


def test_caching_changes_no_token_and_saves_prefill():
    """Same outcomes and tokens with and without the cache (the oracle's tokens depend only
    on the sequence); the cache serves a large share of the prompt tokens."""
    reqs = workload(random.Random(3), 60)
    outs = {}
    for caching in (False, True):
        loop, sched, oracle, _ = make(12, caching=caching)
        states = loop.run(reqs, realtime=True)
        assert oracle.violations == []
        outs[caching] = [(s.status.value, s.output_token_ids) for s in states]
        if caching:
            stats = sched.prefix_cache_stats()
            cached = sum(s.num_cached_tokens for s in states)
            prompt = sum(len(s.prompt_token_ids) for s in states)
            assert stats["hit_blocks"] > 0 and cached / prompt > 0.3, (stats, cached, prompt)
    assert outs[True] == outs[False]


def test_mutation_sharing_a_block_before_it_is_computed_is_caught():
    """Registering a request's full prompt blocks at admission, before its prefill wrote
    them, lets another request map blocks whose KV does not exist yet: the oracle catches it."""
    loop, sched, oracle, alloc = make(12)
    real = sched._admit_with_cache

    def eager(seq):
        real(seq)
        computed = seq.num_computed
        seq.num_computed = (seq.num_tokens // T) * T  # pretend the whole prompt is computed
        try:
            sched._register_full_blocks(seq)
        finally:
            seq.num_computed = computed

    sched._admit_with_cache = eager
    loop.run(workload(random.Random(5), 40), realtime=True)
    assert oracle.violations


def test_mutation_forgetting_a_reference_is_caught():
    """Releasing a cached block without counting the reference lets it be evicted while a
    request still maps it."""
    loop, sched, oracle, alloc = make(5)
    cache = sched.caches[0]
    real = cache.acquire
    cache.acquire = lambda blk: None if blk.refs == 0 else real(blk)  # idle hits not held
    with pytest.raises(AssertionError):
        loop.run(workload(random.Random(7), 60), realtime=True,
                 on_iteration=lambda lp: check_invariants(sched, alloc))


def test_eviction_empties_whole_idle_slabs_first():
    alloc = SlabAllocator(4, 4 * 64)
    cache = PrefixCache(alloc)
    a = alloc.allocate(64, 4)  # slab 1 full
    b = alloc.allocate(64, 2)  # slab 2 half
    for i, blk in enumerate(a + b):
        cache.register("m", 0 if i == 0 else i, (i,), 64, blk)
    for blk in b:  # slab 2's blocks go idle first (oldest) ...
        cache.release(64, blk)
    for blk in a:  # ... then all of slab 1
        cache.release(64, blk)
    alloc.allocate(64, 2)  # slab 2 now also holds two private live blocks
    freed = cache.evict(64)
    assert freed == [(64, sorted(a))]  # the whole idle slab, not the LRU blocks of slab 2
    assert alloc.free_slabs == 2

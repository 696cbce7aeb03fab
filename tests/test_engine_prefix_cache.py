"""Prefix caching in the engine: the same greedy tokens with and without the cache, for every
precision preset, with evicted blocks poisoned (debug mode) under memory pressure."""

import pytest

from fineserve_jax import Engine, ModelSpec, Request, SamplingParams
from fineserve_jax.core.buckets import Buckets
from fineserve_jax.scheduler.local import SchedulerConfig
from fineserve_jax.workload import PrefixSharing, generate_workload

SMALL = Buckets(decode_sizes=(1, 4, 8), prefill_sizes=(16, 64), prefill_seqs=4)
ALL_PRESETS = ["org", "fp8", "fp8_kv8", "awq", "qoq", "int8", "int8_kv8"]


def requests(names, n=24, seed=0):
    wl = generate_workload({m: 1.0 for m in names}, num_requests=n, seed=seed, lengths=(6, 6),
                           prefixes=PrefixSharing(shared_fraction=0.8, prefix_len=24, prefixes_per_model=2))
    return [Request(w.model, w.prompt_tokens(250), SamplingParams(max_tokens=6, ignore_eos=True),
                    request_id=w.request_id) for w in wl]


def serve(presets, caching, arena_kib=48, **kw):
    models = [ModelSpec(p, "tiny-llama", p) for p in presets]
    eng = Engine(models, arena_bytes=arena_kib << 10, slab_target_bytes=8 << 10, max_model_len=64,
                 tokens_per_block=4, buckets=SMALL, profile_reps=0, compaction_interval=4,
                 scheduler=SchedulerConfig(admission="fcfs", execution="round_robin", drop=False),
                 enable_prefix_caching=caching, debug_poison=caching, **kw)
    outs = eng.run(requests(presets), realtime=False)
    return eng, outs


def check_same_tokens(presets):
    plain_eng, plain = serve(presets, False)
    eng, cached = serve(presets, True)
    assert [o.status for o in cached] == ["finished"] * len(cached)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    stats = eng.scheduler.prefix_cache_stats()
    assert stats["hit_blocks"] > 0 and stats["evicted_blocks"] > 0, stats
    assert sum(o.num_cached_tokens for o in cached) > 0
    assert all(o.num_cached_tokens == 0 for o in plain)
    assert eng.steady_state_compiles == 0


def test_cached_prefixes_give_the_same_tokens_two_kv_formats():
    check_same_tokens(["org", "qoq"])


@pytest.mark.slow
def test_cached_prefixes_give_the_same_tokens_every_preset():
    check_same_tokens(ALL_PRESETS)


def test_mutation_a_cache_that_ignores_the_model_changes_tokens():
    """Keys without the model would share one model's KV with another model of the same
    block format: the outputs change (the check above is not vacuous). Two tiny-llama models
    with different weights, the same system prompt for both."""
    from fineserve_jax import load_model
    from fineserve_jax.kvslab.prefix_cache import PrefixCache

    specs = [ModelSpec("m0", load_model("tiny-llama", dtype="float32", seed=0)),
             ModelSpec("m1", load_model("tiny-llama", dtype="float32", seed=1))]
    system = list(range(10, 34))
    reqs = [Request(f"m{i % 2}", system + [40 + i], SamplingParams(max_tokens=6, ignore_eos=True))
            for i in range(8)]

    def run(caching):
        eng = Engine(specs, arena_bytes=512 << 10, slab_target_bytes=8 << 10, max_model_len=64,
                     tokens_per_block=4, buckets=SMALL, profile_reps=0,
                     scheduler=SchedulerConfig(admission="fcfs", execution="fcfs", drop=False),
                     enable_prefix_caching=caching)
        first = eng.run(reqs[:1], realtime=False)  # m0 computes (and caches) the system prompt
        rest = eng.run(reqs[1:], realtime=False)
        if caching:
            assert eng.scheduler.prefix_cache_stats()["hit_blocks"] > 0
        return [o.token_ids for o in first + rest]

    plain = run(False)
    real_match, real_register = PrefixCache.match, PrefixCache.register
    PrefixCache.match = lambda self, model, blocks: real_match(self, "any", blocks)
    PrefixCache.register = lambda self, model, *a: real_register(self, "any", *a)
    try:
        shared = run(True)
    finally:
        PrefixCache.match, PrefixCache.register = real_match, real_register
    assert shared != plain

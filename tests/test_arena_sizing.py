"""`arena_bytes="auto"`: the arena holds the largest decode bucket plus a packed prefill of
full-context sequences of every model, capped by the memory the device has."""

import pytest

from fineserve_jax.core.buckets import Buckets
from fineserve_jax.engine.arena_sizing import auto_arena_bytes, memory_cap_bytes, wanted_arena_bytes


class _Device:
    """Stands in for a jax Device's memory report (only `memory_stats` is read)."""

    def __init__(self, stats):
        self._stats = stats

    def memory_stats(self):
        return self._stats


def test_wanted_bytes_cover_every_model_at_full_context():
    # model a: 1000 B blocks x 8 per sequence; model b: 300 B x 4; 5 sequences each.
    slab = 4096
    got = wanted_arena_bytes([1000, 300], [8, 4], 5, slab)
    need = 5 * (8 * 1000 + 4 * 300)
    assert got % slab == 0
    # whole slabs for the need, one partly used slab per format, reserved slab 0
    assert got == (-(-need // slab) + 2 + 1) * slab


def test_gpu_cap_uses_free_memory():
    dev = _Device({"bytes_limit": 100 << 20, "bytes_in_use": 60 << 20})
    cap, source = memory_cap_bytes(dev)
    assert source == "device memory_stats" and cap == int((40 << 20) * 0.9)
    got, why = auto_arena_bytes([1 << 20], [64], 40, 1 << 20, dev)
    assert got <= cap and got % (1 << 20) == 0 and "capped" in why
    small, why = auto_arena_bytes([1024], [4], 2, 4096, dev)
    assert small == wanted_arena_bytes([1024], [4], 2, 4096) and "capped" not in why


def test_cpu_cap_from_host_memory():
    cap, source = memory_cap_bytes(_Device(None))
    assert source == "host physical memory" and cap > 0


def test_llm_default_arena_fits_the_largest_decode_bucket():
    from fineserve_jax.engine.llm import LLM

    buckets = Buckets(decode_sizes=(1, 4), prefill_sizes=(32,), prefill_seqs=2)
    llm = LLM("tiny-llama", max_model_len=64, buckets=buckets, profile_reps=0,
              compilation_cache_dir=None)
    eng = llm.engine
    fmt = eng.formats["model"]
    assert eng.startup["arena_sizing"].startswith("auto")
    usable = (eng.num_slabs - 2) * eng.slab_bytes  # minus slab 0 and a partly used slab
    assert usable >= (4 + 2) * (64 // 16) * fmt.block_bytes
    with pytest.raises(ValueError, match="arena_bytes"):
        LLM("tiny-llama", arena_bytes="big")

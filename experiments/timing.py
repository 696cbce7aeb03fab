"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def time_call(fn, args, reps: int, warmup: int, stat: str = "median") -> float:
    """Median (or, with stat="min", fastest) seconds per call; compile and warm-up calls are
    not timed. The minimum is the steadier figure on a CPU shared with other jobs."""
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
    jax.block_until_ready(fn(*args))
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if stat == "median" else min(times)


def copy_bandwidth(nbytes: int, reps: int, warmup: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of an elementwise
    pass over a uint32 buffer: the practical ceiling for a memory-bound kernel."""
    x = jnp.zeros((nbytes // 4,), jnp.uint32)
    fn = jax.jit(lambda a: a ^ jnp.uint32(1))
    return 2 * x.size * 4 / time_call(fn, (x,), reps, warmup)

"""On-device sampling with per-row parameters as arrays (inside the compiled step)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def sample_tokens(logits, temperature, top_k, top_p, seeds, steps):
    """Pick one token per row.

    logits [R, V] float32; temperature [R] f32 (0 = greedy); top_k [R] int32 (0 = off);
    top_p [R] f32 (1 = off); seeds [R] uint32; steps [R] int32 (index of the token being
    generated: the key is fold_in(PRNGKey(seed), step), so a row's draw never depends on
    the other rows of the batch). Returns [R] int32.
    """
    greedy = greedy_tokens(logits)
    # The vocabulary sort only runs when some row samples (a full sort of a 128k vocabulary
    # per step is not free on a GPU).
    return jax.lax.cond(jnp.any(temperature > 0),
                        lambda: _sample(logits, greedy, temperature, top_k, top_p, seeds, steps),
                        lambda: greedy)


def greedy_tokens(logits):
    """argmax over the last axis: [R, V] -> [R] int32, first index of the maximum (of the
    first NaN where a row has one), as `jnp.argmax`.

    In two stages over chunks of the vocabulary (`_chunk`): each chunk's maximum (NaN left
    out) and whether it holds a NaN, then the first index inside the one chunk that holds
    the answer. XLA's CPU backend runs `jnp.argmax` as a (value, index) pair reduction that
    does not vectorize, and a max over whole rows followed by a min over matching indices
    materializes two [R, V] temporaries; on SmolLM2's [64, 49152] logits this is 1.9 ms
    against 9.0 (and 8.1 for argmax), and the sampler around it 1.7 against 20 ms.
    """
    r, v = logits.shape
    c = _chunk(v)
    x = logits.reshape(r, v // c, c)
    nan = jnp.isnan(x)
    chunk_max = jnp.max(jnp.where(nan, -jnp.inf, x), axis=-1)  # [R, V / c]
    chunk_nan = jnp.any(nan, axis=-1)
    row_nan = jnp.any(chunk_nan, axis=-1, keepdims=True)  # [R, 1]
    top = jnp.max(chunk_max, axis=-1, keepdims=True)
    j = jnp.argmax(jnp.where(row_nan, chunk_nan, chunk_max == top), axis=-1)  # [R]
    chunk = jnp.take_along_axis(x, j[:, None, None], axis=1)[:, 0]  # [R, c]
    hit = jnp.where(row_nan, jnp.isnan(chunk), chunk == top)
    return (j * c + jnp.argmax(hit, axis=-1)).astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def _chunk(v: int) -> int:
    """The divisor of the vocabulary size v in [256, 4096] closest to 1024 (v itself when it
    has none: one chunk)."""
    best = v
    for c in range(256, min(v, 4096) + 1):
        if v % c == 0 and abs(c - 1024) < abs(best - 1024):
            best = c
    return best


def _sample(logits, greedy, temperature, top_k, top_p, seeds, steps):
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    srt = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)
    srt = jnp.where(jnp.arange(v)[None, :] < k[:, None], srt, -jnp.inf)
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (cum - jax.nn.softmax(srt, axis=-1)) < top_p[:, None]
    pth = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth, pth)
    masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.PRNGKey(s), n))(seeds, steps)
    drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

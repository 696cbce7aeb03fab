"""Cutting packed prefill queries into per-sequence tiles (shared by the prefill kernels).

The packed queries of one sequence are contiguous and in increasing position order, so they
are cut into *query tiles* of `q_tile` tokens that never straddle two sequences. The tile list
(sequence, first packed row, number of rows) has a static upper bound on its length,
`ceil(N / q_tile) + min(S, N)`; spare tiles have 0 rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["query_tiles"]


def query_tiles(q_seq: jax.Array, q_pos: jax.Array, num_seqs: int, q_tile: int):
    """Cut packed query tokens into per-sequence tiles (jnp, runs outside the kernel).

    Args:
      q_seq, q_pos: int32 `[N]` (q_pos -1: padding, not counted).
    Returns: int32 `[num_tiles]` arrays (tile_seq, tile_row0, tile_rows) with the static
      `num_tiles = ceil(N / q_tile) + min(num_seqs, N)`; tiles past the last have 0 rows.
    """
    n = q_seq.shape[0]
    real = q_pos >= 0
    seq = jnp.clip(q_seq, 0, num_seqs - 1)
    count = jnp.zeros((num_seqs,), jnp.int32).at[seq].add(real.astype(jnp.int32))
    first = jnp.full((num_seqs,), n, jnp.int32).at[seq].min(
        jnp.where(real, jnp.arange(n, dtype=jnp.int32), n))
    tiles = (count + q_tile - 1) // q_tile
    cum = jnp.cumsum(tiles)
    num_tiles = -(-n // q_tile) + min(num_seqs, n)
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    tile_seq = jnp.clip(jnp.searchsorted(cum, t, side="right"), 0, num_seqs - 1).astype(jnp.int32)
    local = t - (cum - tiles)[tile_seq]
    live = t < cum[-1]
    tile_row0 = jnp.where(live, first[tile_seq] + local * q_tile, 0)
    tile_rows = jnp.where(live, jnp.clip(count[tile_seq] - local * q_tile, 0, q_tile), 0)
    return tile_seq, tile_row0.astype(jnp.int32), tile_rows.astype(jnp.int32)

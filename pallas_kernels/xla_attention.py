"""Paged attention in plain XLA that reads only the blocks a step needs (impl "xla").

The reference (`reference.py`) gathers every query's whole block-table row and attends over
it at once: simple, but its work and memory grow with the table width (and, in prefill, with
the number of query tokens times the width). This path does what the Pallas kernels do, in
XLA ops:

- queries are grouped into *tiles* that share one sequence: decode has one query per tile
  (a batch row); prefill cuts the packed tokens with `query_tiles`, so the K/V of a
  sequence is gathered once per tile of `q_tile` tokens, not once per token;
- a loop walks the block columns `blocks_per_step` at a time, up to the longest live context
  in the batch (a dynamic trip count: a batch of short contexts does few steps whatever the
  table width), gathering and dequantizing only those blocks of this layer
  (`gather_layer_kv`: two windowed gathers per block) and keeping an online softmax in
  float32 (`tile_math.MASK`, selects with `where`, so NaN in a block or past a length never
  leaks).

Every tile of the batch runs every step (one batched XLA computation per step); a tile whose
context is shorter than the batch's longest does masked work in the later steps. Results
equal the reference up to float32 summation order (tests compare them on NaN-poisoned arenas,
with mutations).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from fineserve_jax.formats import KVFormat
from pallas_kernels.kv_gather import gather_layer_kv
from pallas_kernels.query_tiles import query_tiles
from pallas_kernels.tile_math import MASK

__all__ = ["decode_attention_xla", "prefill_attention_xla", "tile_attention", "num_steps",
           "TOKENS_PER_STEP", "DEFAULT_Q_TILE"]

# Default work sizes. On the 2-core CPU with the SmolLM2-135M shape, one layer's attention
# hardly changes between 32 and 256 tokens per step or q tiles of 16 to 64 (decode batch 32:
# 1.0-1.2 ms; prefill of 256 tokens: 4.2-5.5 ms); smaller steps waste less on short rows.
TOKENS_PER_STEP = 64  # blocks per loop step = max(1, TOKENS_PER_STEP // tokens_per_block)
DEFAULT_Q_TILE = 32


def _blocks_per_step(fmt: KVFormat, blocks_per_step):
    if blocks_per_step is None:
        return max(1, TOKENS_PER_STEP // fmt.tokens_per_block)
    if blocks_per_step < 1:
        raise ValueError(f"blocks_per_step must be >= 1, got {blocks_per_step}")
    return blocks_per_step


def num_steps(max_pos: jax.Array, tokens_per_step: int) -> jax.Array:
    """Loop steps that cover positions 0..max_pos (0 when max_pos is -1: nothing to read)."""
    return (max_pos + tokens_per_step) // tokens_per_step


def tile_attention(q: jax.Array, pos: jax.Array, tables: jax.Array, view: jax.Array,
                   fmt: KVFormat, layer, blocks_per_step=None) -> jax.Array:
    """Causal attention of tiles of queries over their sequence's blocks.

    Args:
      q: `[U, R, Hq, D]`: U tiles of R query rows; pos: int32 `[U, R]`: a row attends to
        positions 0..pos of its tile's sequence (-1: no query -> zeros);
      tables: int32 `[U, W]`: the block-table row of each tile's sequence;
      view: uint32 `[num_blocks, block_words]`; layer: int or int32 scalar (traced).
    Returns: float32 `[U, R, Hq, D]`.
    """
    c = _blocks_per_step(fmt, blocks_per_step)
    u, r, hq, d = q.shape
    h, t = fmt.num_kv_heads, fmt.tokens_per_block
    g, n = hq // h, c * t
    qg = q.astype(jnp.float32).reshape(u, r, h, g, d)
    tile_max = jnp.max(pos, axis=1)  # [U]: a tile reads positions 0..tile_max
    sm_scale = 1.0 / math.sqrt(d)

    def body(i, carry):
        m, l, acc = carry  # m, l: [U, H, G, R]; acc: [U, H, G, R, D]
        cols = i * c + jnp.arange(c, dtype=jnp.int32)  # [C] block columns of this step
        kpos = (cols[:, None] * t + jnp.arange(t, dtype=jnp.int32)).reshape(n)  # [P]
        live = kpos[None, :] <= tile_max[:, None]  # [U, P] (columns past W: past any pos)
        bids = jnp.take(tables, cols, axis=1, mode="clip")  # [U, C]
        k, v = gather_layer_kv(view, fmt, layer, bids)  # [U, C, T, H, D] float32
        k, v = k.reshape(u, n, h, d), v.reshape(u, n, h, d)
        v = jnp.where(live[:, :, None, None], v, 0.0)
        s = jnp.einsum("urhgd,uphd->uhgrp", qg, k, precision=lax.Precision.HIGHEST) * sm_scale
        keep = (kpos[None, None, :] <= pos[:, :, None]) & live[:, None, :]  # [U, R, P]
        keep = keep[:, None, None]  # [U, 1, 1, R, P]
        s = jnp.where(keep, s, MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(keep, jnp.exp(s - m_new[..., None]), 0.0)
        l_new = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("uhgrp,uphd->uhgrd", p, v, precision=lax.Precision.HIGHEST)
        return m_new, l_new, acc * corr[..., None] + pv

    init = (jnp.full((u, h, g, r), MASK, jnp.float32), jnp.zeros((u, h, g, r), jnp.float32),
            jnp.zeros((u, h, g, r, d), jnp.float32))
    _, l, acc = lax.fori_loop(0, num_steps(jnp.max(tile_max), n), body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # no valid position (l = 0): zeros
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(u, r, hq, d)


def decode_attention_xla(q: jax.Array, kv_view: jax.Array, block_tables: jax.Array,
                         lengths: jax.Array, *, fmt: KVFormat, layer,
                         blocks_per_step=None) -> jax.Array:
    """q `[B, Hq, D]`, block_tables int32 `[B, W]`, lengths int32 `[B]` (0: zeros) ->
    `[B, Hq, D]` in q's dtype. One tile per batch row."""
    pos = (lengths.astype(jnp.int32) - 1)[:, None]
    out = tile_attention(q[:, None], pos, block_tables.astype(jnp.int32), kv_view, fmt, layer,
                         blocks_per_step)
    return out[:, 0].astype(q.dtype)


def prefill_attention_xla(q: jax.Array, kv_view: jax.Array, block_tables: jax.Array,
                          q_seq: jax.Array, q_pos: jax.Array, *, fmt: KVFormat, layer,
                          q_tile: int = DEFAULT_Q_TILE, blocks_per_step=None) -> jax.Array:
    """q `[N, Hq, D]` packed, block_tables int32 `[S, W]`, q_seq/q_pos int32 `[N]` (q_pos -1:
    padding -> zeros) -> `[N, Hq, D]` in q's dtype. A sequence's tokens are contiguous and
    in increasing position order (the packing contract of `prefill_attention`)."""
    n = q.shape[0]
    # q_tile is NOT capped by n: the per-tile shapes (and with them XLA's summation order)
    # must not depend on the prefill bucket, or a prompt's logits would depend on how many
    # tokens shared its step (batch invariance; a small bucket pays padded rows instead).
    q_tile = max(1, q_tile)
    q_pos = q_pos.astype(jnp.int32)
    tile_seq, row0, rows = query_tiles(q_seq.astype(jnp.int32), q_pos, block_tables.shape[0],
                                       q_tile)
    offs = jnp.arange(q_tile, dtype=jnp.int32)
    idx = row0[:, None] + offs  # [U, R] packed row of each tile row
    valid = offs[None, :] < rows[:, None]
    src = jnp.clip(idx, 0, n - 1)
    pos = jnp.where(valid, q_pos[src], -1)
    tables = block_tables.astype(jnp.int32)[tile_seq]
    out = tile_attention(q[src], pos, tables, kv_view, fmt, layer, blocks_per_step)
    dst = jnp.where(valid, idx, n)  # rows no tile covers stay zeros (padding)
    packed = jnp.zeros((n, *q.shape[1:]), jnp.float32).at[dst].set(out, mode="drop")
    return packed.astype(q.dtype)

"""Paged prefill attention over the KV arena: Pallas, Triton lowering (GPU; CPU interpreted).

Supports chunked prefill and prefix reuse: every query token attends causally to positions
`0..q_pos` of its sequence, all already written into the arena (including the chunk's own
tokens), so the kernel only reads the arena, through the block table.

Work split: the packed queries are cut into *query tiles* of `q_tile` tokens that never
straddle two sequences (`query_tiles`, outside the kernel; spare tiles have 0 rows and do
nothing). Grid `(tiles, kv_heads)`: a program holds `q_tile x G` query rows (the GQA group,
padded to a power of 2) and walks the sequence's blocks up to the tile's last position with
an online softmax. The layer is a runtime input (one compiled kernel for every layer).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fineserve_jax.formats import KVFormat
from pallas_kernels import kv_unpack, tile_math
from pallas_kernels.query_tiles import query_tiles
from pallas_kernels.tile_math import is_pow2
from pallas_kernels.triton_compat import compiler_params, load, store

__all__ = ["prefill_attention_triton", "query_tiles"]


def _prefill_kernel(tseq_ref, trow_ref, tn_ref, q_ref, kv_ref, bt_ref, qpos_ref, layer_ref,
                    o_ref, *, fmt: KVFormat, q_tile: int, group: int,
                    blocks_per_step: int, width: int, sm_scale: float, cdt):
    # q_ref / o_ref: [H, e, (N + q_tile) * Gp, dw], row = token * Gp + group member;
    # qpos_ref: [N + q_tile] int32 (-1 padded); bt_ref: [S, W]; kv_ref: [blocks, words];
    # layer_ref: [1] int32 (the layer is a runtime input: one kernel for every layer).
    layer = layer_ref[0]
    tile = pl.program_id(0)
    h = pl.program_id(1)
    t = fmt.tokens_per_block
    e = fmt.elems_per_word
    rows = q_tile * group
    n = blocks_per_step * t

    seq = tseq_ref[tile]
    row0 = trow_ref[tile]
    nrows = tn_ref[tile]
    tok_row = lax.broadcasted_iota(jnp.int32, (rows,), 0) // group
    row_pos = load(qpos_ref.at[row0 + tok_row])
    row_valid = (tok_row < nrows) & (row_pos >= 0)
    row_pos = jnp.where(row_valid, row_pos, -1)
    max_pos = jnp.max(row_pos)  # -1 for a spare tile: no KV step at all
    num_steps = ((max_pos + t) // t + blocks_per_step - 1) // blocks_per_step

    q_rows = pl.ds(row0 * group, rows)
    # jnp.int32(k): the interpret-mode load/store discharge rejects a bare Python int index
    # mixed with slices.
    q_planes = tuple(load(q_ref.at[h, jnp.int32(k), q_rows, :]) for k in range(e))

    slot = lax.broadcasted_iota(jnp.int32, (n,), 0) // t
    tok = lax.broadcasted_iota(jnp.int32, (n,), 0) % t

    def body(i, carry):
        m, l, acc = carry
        cols = i * blocks_per_step + slot
        pos = cols * t + tok
        kv_valid = (pos <= max_pos) & (cols < width)
        bid = load(bt_ref.at[seq, cols], mask=kv_valid, other=0)
        k_planes = kv_unpack.load_kv_tile(kv_ref, fmt, layer, 0, h, bid, tok, kv_valid)
        scores = tile_math.planes_scores(q_planes, k_planes, cdt, sm_scale)  # [rows, n]
        causal = kv_valid[None, :] & (pos[None, :] <= row_pos[:, None])
        v_planes = kv_unpack.load_kv_tile(kv_ref, fmt, layer, 1, h, bid, tok, kv_valid)
        return tile_math.online_softmax_step(m, l, acc, scores, causal, v_planes, cdt)

    dw = fmt.data_words
    init = (jnp.full((rows,), tile_math.MASK, jnp.float32), jnp.zeros((rows,), jnp.float32),
            tuple(jnp.zeros((rows, dw), jnp.float32) for _ in range(e)))
    m, l, acc = lax.fori_loop(0, num_steps, body, init)
    inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)[:, None]
    out_mask = jnp.broadcast_to(row_valid[:, None], (rows, dw))
    for k in range(e):
        store(o_ref.at[h, jnp.int32(k), q_rows, :], (acc[k] * inv).astype(o_ref.dtype), mask=out_mask)


def prefill_attention_triton(q: jax.Array, kv_view: jax.Array, block_tables: jax.Array,
                             q_seq: jax.Array, q_pos: jax.Array, *, fmt: KVFormat, layer,
                             interpret: bool, q_tile: int | None = None,
                             blocks_per_step: int | None = None,
                             num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """Prefill attention (chunked prefill / prefix reuse) over the arena.

    Args:
      q: `[N, Hq, D]` packed query tokens; kv_view: uint32 `[num_blocks, block_words]`;
      block_tables: int32 `[S, W]`; q_seq: int32 `[N]` row of block_tables of each token;
      q_pos: int32 `[N]` absolute position (-1: padding -> zeros). A sequence's tokens are
        contiguous and in increasing position order.
      layer: int or int32 scalar (traced: a runtime input of the kernel).
      q_tile: query tokens per tile (power of 2; None: 64 rows / group on GPU, 4 interpreted).
      blocks_per_step: KV blocks per inner tile (power of 2; None: 64 tokens on GPU, 1).
    Returns: `[N, Hq, D]` in q's dtype.
    """
    g, blocks_per_step = tile_math.check_query_geometry(q.shape, fmt, blocks_per_step, interpret)
    n, hq, d = q.shape
    h, e, dw = fmt.num_kv_heads, fmt.elems_per_word, fmt.data_words
    num_seqs, width = block_tables.shape
    gp = pl.next_power_of_2(g)
    if q_tile is None:
        q_tile = 4 if interpret else max(1, 64 // gp)
    if not is_pow2(q_tile):
        raise ValueError(f"q_tile must be a power of 2, got {q_tile}")
    cdt = tile_math.compute_dtype(q.dtype)
    q_pos = q_pos.astype(jnp.int32)
    tile_seq, tile_row0, tile_rows = query_tiles(q_seq.astype(jnp.int32), q_pos, num_seqs,
                                                 q_tile)

    # [N, Hq, D] -> [H, e, (N + q_tile) * Gp, dw]: one contiguous run of rows per tile. The
    # extra q_tile tokens keep every tile's slice in bounds (interpret mode clamps slices).
    qg = jnp.pad(q.reshape(n, h, g, d), ((0, q_tile), (0, 0), (0, gp - g), (0, 0)))
    qp = kv_unpack.split_subwords(qg, e)  # [N + q_tile, H, Gp, e, dw]
    qp = jnp.transpose(qp, (1, 3, 0, 2, 4)).reshape(h, e, (n + q_tile) * gp, dw).astype(cdt)
    pos_padded = jnp.pad(q_pos, (0, q_tile), constant_values=-1)

    kernel = functools.partial(
        _prefill_kernel, fmt=fmt, q_tile=q_tile, group=gp,
        blocks_per_step=blocks_per_step, width=width, sm_scale=1.0 / math.sqrt(d), cdt=cdt)
    out = pl.pallas_call(
        kernel,
        grid=(tile_seq.shape[0], h),
        in_specs=[pl.no_block_spec] * 8,
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        interpret=interpret,
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        name=f"prefill_{fmt.kv_dtype}",
    )(tile_seq, tile_row0, tile_rows, qp, kv_view, block_tables.astype(jnp.int32), pos_padded,
      jnp.asarray(layer, jnp.int32).reshape(1))

    out = out.reshape(h, e, n + q_tile, gp, dw)[:, :, :n]
    out = kv_unpack.merge_subwords(jnp.transpose(out, (2, 0, 3, 1, 4)))  # [N, H, Gp, D]
    out = out[:, :, :g, :].reshape(n, hq, d)
    # Rows no tile covers (padding) were never written: select zeros, whatever is there.
    return jnp.where((q_pos >= 0)[:, None, None], out, jnp.zeros((), q.dtype))

"""Paged decode attention over the KV arena: Pallas, Triton lowering (GPU; CPU interpreted).

Grid `(batch, kv_heads, splits)`. One program takes one sequence, one KV head (all `G` query
heads of its GQA group as the rows of its tiles, padded to a power of 2) and one split of the
block table (split-K: long contexts are cut into `splits` column ranges whose partial results
are merged outside the kernel with a log-sum-exp combine). It walks its column range
`blocks_per_step` blocks at a time, loading block ids from the block table in-kernel (no
scalar prefetch on GPU), dequantizing K and V rows of its layer and head in-kernel
(`kv_unpack.load_kv_tile`), and keeps an online softmax in float32. The layer is a runtime
input (a one-element int32 array), so one compiled kernel serves every layer of the scan.

Masking: the loop stops at the sequence's last block, and inside a tile every row at or past
`length` is neither read (masked load, zeros) nor kept (`where`), for V as for the scores;
a split with nothing to do and a padded row (length 0) produce exact zeros.
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
from pallas_kernels.triton_compat import SQUEEZED as _S
from pallas_kernels.triton_compat import compiler_params, load

__all__ = ["decode_attention_triton", "default_num_splits"]

# Target number of programs in flight on an H200 (132 SMs, ~2 programs each) when picking
# the default number of splits.
_TARGET_PROGRAMS = 264


def default_num_splits(batch: int, kv_heads: int, width: int, blocks_per_step: int) -> int:
    """Enough programs to fill the GPU, never more splits than column tiles."""
    col_tiles = -(-width // blocks_per_step)
    want = -(-_TARGET_PROGRAMS // max(1, batch * kv_heads))
    return max(1, min(want, col_tiles))


def _decode_kernel(q_ref, kv_ref, bt_ref, len_ref, layer_ref, o_ref, m_ref, l_ref, *,
                   fmt: KVFormat, blocks_per_step: int, cols_per_split: int, width: int,
                   sm_scale: float, cdt):
    # q_ref: [e, Gp, dw] planes of this (sequence, kv head); kv_ref: [num_blocks, block_words]
    # bt_ref: [B, W] int32; len_ref: [B] int32; layer_ref: [1] int32;
    # o_ref: [e, Gp, dw] f32; m_ref, l_ref: [Gp].
    layer = layer_ref[0]
    b = pl.program_id(0)
    h = pl.program_id(1)
    s = pl.program_id(2)
    t = fmt.tokens_per_block
    e = fmt.elems_per_word
    n = blocks_per_step * t
    gp = q_ref.shape[1]

    length = len_ref[b]
    q_planes = tuple(q_ref[k] for k in range(e))
    first_col = s * cols_per_split
    end_col = jnp.minimum(first_col + cols_per_split, (length + t - 1) // t)
    num_steps = (jnp.maximum(end_col - first_col, 0) + blocks_per_step - 1) // blocks_per_step

    slot = lax.broadcasted_iota(jnp.int32, (n,), 0) // t  # block slot of each tile row
    tok = lax.broadcasted_iota(jnp.int32, (n,), 0) % t  # token inside its block

    def body(i, carry):
        m, l, acc = carry
        cols = first_col + i * blocks_per_step + slot
        pos = cols * t + tok
        valid = (pos < length) & (cols < width)
        bid = load(bt_ref.at[b, cols], mask=valid, other=0)
        k_planes = kv_unpack.load_kv_tile(kv_ref, fmt, layer, 0, h, bid, tok, valid)
        scores = tile_math.planes_scores(q_planes, k_planes, cdt, sm_scale)  # [Gp, n]
        v_planes = kv_unpack.load_kv_tile(kv_ref, fmt, layer, 1, h, bid, tok, valid)
        return tile_math.online_softmax_step(m, l, acc, scores, valid[None, :], v_planes, cdt)

    init = (jnp.full((gp,), tile_math.MASK, jnp.float32), jnp.zeros((gp,), jnp.float32),
            tuple(jnp.zeros(q_planes[0].shape, jnp.float32) for _ in range(e)))
    m, l, acc = lax.fori_loop(0, num_steps, body, init)
    for k in range(e):
        o_ref[k] = acc[k]
    m_ref[...] = m
    l_ref[...] = l


def decode_attention_triton(q: jax.Array, kv_view: jax.Array, block_tables: jax.Array,
                            lengths: jax.Array, *, fmt: KVFormat, layer,
                            interpret: bool, num_splits: int | None = None,
                            blocks_per_step: int | None = None,
                            min_group_rows: int | None = None,
                            num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """Decode attention, one query token per sequence.

    Args:
      q: `[B, Hq, D]` float (bf16/f16 -> bf16/f16 tensor-core dots; else float32 math).
      kv_view: uint32 `[num_blocks, fmt.block_words]`.
      block_tables: int32 `[B, W]`; lengths: int32 `[B]` (0 = padded row -> zeros).
      layer: int or int32 scalar (traced: a runtime input of the kernel, not a constant).
      num_splits: split-K factor (None: enough programs to fill the GPU).
      blocks_per_step: KV blocks per inner tile (power of 2; None: 64 tokens on GPU).
      min_group_rows: pad the GQA group to at least this many rows (16 lets tl.dot run;
        None: 16 on GPU, 1 interpreted).
    Returns: `[B, Hq, D]` in q's dtype.
    """
    g, blocks_per_step = tile_math.check_query_geometry(q.shape, fmt, blocks_per_step, interpret)
    bsz, hq, d = q.shape
    h, e, dw = fmt.num_kv_heads, fmt.elems_per_word, fmt.data_words
    width = block_tables.shape[1]
    if min_group_rows is None:
        min_group_rows = 1 if interpret else 16
    gp = pl.next_power_of_2(max(g, min_group_rows))
    if num_splits is None:
        num_splits = default_num_splits(bsz, h, width, blocks_per_step)
    # Each split covers a whole number of tiles, so no tile crosses a split boundary.
    cols_per_split = -(-(-(-width // num_splits)) // blocks_per_step) * blocks_per_step
    num_splits = -(-width // cols_per_split)
    cdt = tile_math.compute_dtype(q.dtype)

    qg = q.reshape(bsz, h, g, d)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    q_planes = jnp.swapaxes(kv_unpack.split_subwords(qg, e), 2, 3)  # [B, H, e, Gp, dw]
    q_planes = q_planes.astype(cdt)

    kernel = functools.partial(
        _decode_kernel, fmt=fmt, blocks_per_step=blocks_per_step,
        cols_per_split=cols_per_split, width=width, sm_scale=1.0 / math.sqrt(d), cdt=cdt)
    grid = (bsz, h, num_splits)
    o, m, l = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((_S, _S, e, gp, dw), lambda b_, h_, s_: (b_, h_, 0, 0, 0)),
            pl.no_block_spec,  # arena view: whole array, addressed in-kernel
            pl.no_block_spec,  # block tables
            pl.no_block_spec,  # lengths
            pl.no_block_spec,  # layer
        ],
        out_specs=[
            pl.BlockSpec((_S, _S, _S, e, gp, dw),
                         lambda b_, h_, s_: (b_, h_, s_, 0, 0, 0)),
            pl.BlockSpec((_S, _S, _S, gp), lambda b_, h_, s_: (b_, h_, s_, 0)),
            pl.BlockSpec((_S, _S, _S, gp), lambda b_, h_, s_: (b_, h_, s_, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((bsz, h, num_splits, e, gp, dw), jnp.float32),
            jax.ShapeDtypeStruct((bsz, h, num_splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((bsz, h, num_splits, gp), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        name=f"decode_{fmt.kv_dtype}",
    )(q_planes, kv_view, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
      jnp.asarray(layer, jnp.int32).reshape(1))

    # Log-sum-exp combine of the splits. An empty split has m = MASK and l = 0; a row with
    # no valid token at all (length 0) has total l = 0 and yields 0, not 0/0.
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - m_all)  # [B, H, S, Gp]
    l_all = jnp.sum(w * l, axis=2)  # [B, H, Gp]
    o_all = jnp.sum(w[:, :, :, None, :, None] * o, axis=2)  # [B, H, e, Gp, dw]
    o_all = o_all / jnp.where(l_all > 0, l_all, 1.0)[:, :, None, :, None]
    out = kv_unpack.merge_subwords(jnp.swapaxes(o_all, 2, 3))  # [B, H, Gp, D]
    return out[:, :, :g, :].reshape(bsz, hq, d).astype(q.dtype)

"""Pure-jnp paged attention over the KV arena: the test oracle, runs on every backend.

Gather the blocks of each query's block-table row, dequantize with the storage format's
definition (`fineserve_jax.formats.kv_codec`), and run a masked softmax in float32. Decode is the
special case of prefill with one query per sequence at position `length - 1`. `layer` is an
int or an int32 scalar (traced inside the decoder's layer scan).

Cost: it materializes every query's whole (dequantized) context, `[N, W * tokens, kv_heads,
head_dim]` float32, so it is the test oracle and nothing else; `xla_attention` (impl "xla") is the XLA path
that reads only the blocks a step needs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from fineserve_jax.formats import KVFormat
from pallas_kernels.kv_gather import gather_layer_kv

__all__ = ["masked_attention", "decode_attention_reference", "prefill_attention_reference"]


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Causal GQA attention of each query over its own context.

    Args:
      q: `[N, Hq, D]`; k, v: float `[N, P, H, D]` (query n's context, position p);
      q_pos: int32 `[N]`: query n attends to positions `0..q_pos[n]` (-1: none -> zeros).
    Returns: `[N, Hq, D]` in q's dtype. Positions past q_pos are selected away with `where`
    (scores and V), so NaN there cannot leak.
    """
    n, hq, d = q.shape
    p_len, h = k.shape[1], k.shape[2]
    valid = jnp.arange(p_len)[None, :] <= q_pos[:, None]  # [N, P]
    qg = q.astype(jnp.float32).reshape(n, h, hq // h, d)
    s = jnp.einsum("nhgd,nphd->nhgp", qg, k.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) / math.sqrt(d)
    vmask = valid[:, None, None, :]
    s = jnp.where(vmask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(vmask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    v = jnp.where(valid[:, :, None, None], v.astype(jnp.float32), 0.0)
    o = jnp.einsum("nhgp,nphd->nhgd", p, v, precision=lax.Precision.HIGHEST)
    o = o / jnp.where(l > 0, l, 1.0)
    return o.reshape(n, hq, d).astype(q.dtype)


def _paged(q, kv_view, tables, q_pos, fmt: KVFormat, layer):
    n, width = tables.shape
    k, v = gather_layer_kv(kv_view, fmt, layer, tables)  # [N, W, T, H, D]
    shape = (n, width * fmt.tokens_per_block, fmt.num_kv_heads, fmt.head_dim)
    return masked_attention(q, k.reshape(shape), v.reshape(shape), q_pos)


def decode_attention_reference(q: jax.Array, kv_view: jax.Array, block_tables: jax.Array,
                               lengths: jax.Array, *, fmt: KVFormat, layer) -> jax.Array:
    """q `[B, Hq, D]`, kv_view uint32 `[num_blocks, block_words]`, block_tables int32
    `[B, W]`, lengths int32 `[B]` -> `[B, Hq, D]` (q's dtype; length 0 -> zeros)."""
    return _paged(q, kv_view, block_tables, lengths.astype(jnp.int32) - 1, fmt, layer)


def prefill_attention_reference(q: jax.Array, kv_view: jax.Array, block_tables: jax.Array,
                                q_seq: jax.Array, q_pos: jax.Array, *, fmt: KVFormat,
                                layer) -> jax.Array:
    """q `[N, Hq, D]`, block_tables int32 `[S, W]`, q_seq int32 `[N]` (row of block_tables),
    q_pos int32 `[N]` (-1: padding -> zeros) -> `[N, Hq, D]` in q's dtype."""
    tables = block_tables[jnp.clip(q_seq, 0, block_tables.shape[0] - 1)]
    return _paged(q, kv_view, tables, q_pos.astype(jnp.int32), fmt, layer)

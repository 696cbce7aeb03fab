"""Decode and prefill attention over the KV arena through the C++ CPU kernel (impl "cpu").

Both are one ragged operation: query row n attends to positions 0..pos[n] of the sequence
whose block-table row is seq[n] (`ragged_attention.cc`). Decode is one row per sequence
(pos = length - 1); prefill passes the packed tokens' own sequence and position. The kernel
reads only the live blocks of each row's own sequence, in place, and dequantizes in-kernel;
every (row, KV head) is computed alone, so results are batch-invariant.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fineserve_jax.formats import KVFormat
from pallas_kernels.cpu.build import ragged_attention_target

__all__ = ["ragged_attention_cpu", "decode_attention_cpu", "prefill_attention_cpu",
           "KV_DTYPE_CODES"]

KV_DTYPE_CODES = {"bf16": 0, "fp8": 1, "int8": 2, "int4": 3}  # enum KvDtype in the .cc


def ragged_attention_cpu(q: jax.Array, kv_view: jax.Array, block_tables: jax.Array,
                         seq: jax.Array, pos: jax.Array, *, fmt: KVFormat, layer,
                         defines: Tuple[str, ...] = ()) -> jax.Array:
    """q `[N, Hq, D]`, kv_view uint32 `[num_blocks, block_words]`, block_tables int32
    `[S, W]`, seq / pos int32 `[N]` (pos -1 or seq outside 0..S-1: zeros); layer: int or
    int32 scalar (traced). Returns `[N, Hq, D]` in q's dtype (float32 math).
    `defines`: build macros (tests use them for mutated kernels)."""
    target = ragged_attention_target(defines)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), kv_view, block_tables.astype(jnp.int32),
               seq.astype(jnp.int32), pos.astype(jnp.int32), jnp.asarray(layer, jnp.int32),
               kv_dtype=np.int64(KV_DTYPE_CODES[fmt.kv_dtype]),
               num_layers=np.int64(fmt.num_layers), num_kv_heads=np.int64(fmt.num_kv_heads),
               tokens_per_block=np.int64(fmt.tokens_per_block),
               data_words=np.int64(fmt.data_words), scale_words=np.int64(fmt.scale_words))
    return out.astype(q.dtype)


def decode_attention_cpu(q: jax.Array, kv_view: jax.Array, block_tables: jax.Array,
                         lengths: jax.Array, *, fmt: KVFormat, layer,
                         defines: Tuple[str, ...] = ()) -> jax.Array:
    """q `[B, Hq, D]`, block_tables `[B, W]`, lengths `[B]` (0: zeros) -> `[B, Hq, D]`."""
    seq = jnp.arange(q.shape[0], dtype=jnp.int32)
    return ragged_attention_cpu(q, kv_view, block_tables, seq,
                                lengths.astype(jnp.int32) - 1, fmt=fmt, layer=layer,
                                defines=defines)


# Prefill is the ragged call itself: q `[N, Hq, D]` packed, q_seq / q_pos `[N]` (q_pos -1:
# padding -> zeros).
prefill_attention_cpu = ragged_attention_cpu

"""In-kernel loading and dequantization of KV rows, split by sub-word position.

Used by both Triton-style kernels (decode and prefill), for K and for V. A packed word holds
`e = 32 / bits` elements (element 0 in the low bits). Instead of interleaving them back
into `[tokens, head_dim]` inside the kernel (a reshape Triton does badly), a tile is
returned as `e` arrays `[tokens, data_words]`: array `k` holds elements `e*j + k` of each
row. The kernels pre-permute `q` the same way outside (`split_subwords`) and re-interleave
their outputs outside (`merge_subwords`), so no in-kernel reshape or transpose is needed.

Everything here is plain jnp on values (shifts, masks, bitcasts), so the same code runs
interpreted on CPU and lowers to Triton.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax

from fineserve_jax.formats import KVFormat
from fineserve_jax.formats import kv_layout as layout
from pallas_kernels.triton_compat import load

__all__ = ["unpack_subwords", "load_kv_tile", "split_subwords", "merge_subwords"]


def _u32(x: int):
    return jnp.uint32(x)


def unpack_subwords(words: jax.Array, kv_dtype: str) -> Tuple[jax.Array, ...]:
    """Decode packed words into their `e` sub-word element planes (codes, no scale).

    Args:
      words: uint32 `[..., data_words]`.
    Returns:
      `e` float32 arrays `[..., data_words]`; plane `k` = element `e*j + k` of the row:
      bf16 values, fp8 e4m3fn values, int8 integers, or int4 nibbles 0..15.
    """
    if kv_dtype == "bf16":
        # A bf16 is the high half of an f32: moving the 16 bits up is an exact conversion.
        lo = lax.bitcast_convert_type(words << _u32(16), jnp.float32)
        hi = lax.bitcast_convert_type(words & _u32(0xFFFF0000), jnp.float32)
        return lo, hi
    if kv_dtype == "fp8":
        out = []
        for k in range(4):
            byte = ((words >> _u32(8 * k)) & _u32(0xFF)).astype(jnp.uint8)
            out.append(lax.bitcast_convert_type(byte, jnp.float8_e4m3fn).astype(jnp.float32))
        return tuple(out)
    if kv_dtype == "int8":
        out = []
        for k in range(4):
            # Move byte k to the top, then an arithmetic shift sign-extends it.
            top = lax.bitcast_convert_type(words << _u32(24 - 8 * k), jnp.int32)
            out.append(lax.shift_right_arithmetic(top, jnp.int32(24)).astype(jnp.float32))
        return tuple(out)
    if kv_dtype == "int4":
        return tuple(((words >> _u32(4 * k)) & _u32(0xF)).astype(jnp.float32)
                     for k in range(8))
    raise ValueError(f"unknown KV dtype {kv_dtype!r}")


def load_kv_tile(kv_ref, fmt: KVFormat, layer, kv: int, head, block_ids: jax.Array,
                 token_in_block: jax.Array, valid: jax.Array) -> Tuple[jax.Array, ...]:
    """Load and dequantize one (layer, K|V, head) tile of rows from the arena view.

    Args:
      kv_ref: uint32 ref `[num_blocks, block_words]` (the typed arena view, whole array).
      layer: int32 scalar (loaded from the kernel's layer input); kv: static int (0 = K,
        1 = V); head: scalar (may be a program id).
      block_ids: int32 `[n]` block of each row; token_in_block: int32 `[n]`;
      valid: bool `[n]`: rows to read. Invalid rows are not read from memory and come
        back as exact zeros (data and scale), so garbage or NaN past a sequence's end
        never enters the arithmetic.
    Returns:
      `e` float32 arrays `[n, data_words]` of dequantized values, split by sub-word
      position (see module doc).
    """
    n = block_ids.shape[0]
    dw = fmt.data_words
    # 2-D indexing (block, word) rather than a flat word index: the lowering widens the
    # block index to 64 bits for arenas over 4 GiB, where a flat int32 index would overflow.
    rows_data = layout.data_offset(fmt, layer, kv, head, token_in_block)  # [n]
    word = rows_data[:, None] + lax.broadcasted_iota(jnp.int32, (n, dw), 1)
    blk = jnp.broadcast_to(block_ids[:, None], (n, dw))
    mask = jnp.broadcast_to(valid[:, None], (n, dw))
    words = load(kv_ref.at[blk, word], mask=mask, other=0)
    planes = unpack_subwords(words, fmt.kv_dtype)
    if fmt.scale_words == 0:
        return planes

    rows_scale = layout.scale_offset(fmt, layer, kv, head, token_in_block)  # [n]

    def scale_word(i):
        w = load(kv_ref.at[block_ids, rows_scale + i], mask=valid, other=0)
        return lax.bitcast_convert_type(w, jnp.float32)[:, None]  # [n, 1]

    scale = scale_word(0)
    if fmt.kv_dtype == "int4":
        zero = scale_word(1)
        return tuple(p * scale + zero for p in planes)
    return tuple(p * scale for p in planes)


def split_subwords(x: jax.Array, elems_per_word: int) -> jax.Array:
    """`[..., head_dim]` -> `[..., e, head_dim / e]` with `out[..., k, j] = x[..., e*j + k]`."""
    *lead, d = x.shape
    x = x.reshape(*lead, d // elems_per_word, elems_per_word)
    return jnp.swapaxes(x, -1, -2)


def merge_subwords(x: jax.Array) -> jax.Array:
    """Inverse of `split_subwords`: `[..., e, head_dim / e]` -> `[..., head_dim]`."""
    *lead, e, dw = x.shape
    return jnp.swapaxes(x, -1, -2).reshape(*lead, e * dw)

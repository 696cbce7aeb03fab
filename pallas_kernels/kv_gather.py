"""Gather one layer's K and V rows of given blocks from the arena view, dequantized (XLA).

The K and V data of one layer form one contiguous window of each block
(`[2, kv_heads, tokens, data_words]`), and so do their scales, so a block costs two windowed
gathers, not one index per word. Used by `read_kv` and by the reference attention.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax

from fineserve_jax.formats import KVFormat
from fineserve_jax.formats import kv_layout as layout
from fineserve_jax.formats.kv_codec import dequantize_kv_rows
from pallas_kernels.layer_arg import check_layer

__all__ = ["gather_windows", "gather_layer_kv"]


def gather_windows(view: jax.Array, block_ids: jax.Array, start, size: int) -> jax.Array:
    """`view[block_ids, start:start + size]` as one gather: uint32 `[*block_ids.shape, size]`.
    start: int or int32 scalar (traced: the layer's window); size: static."""
    ids = block_ids.astype(jnp.int32)
    idx = jnp.stack([ids, jnp.full_like(ids, start)], axis=-1)
    dnums = lax.GatherDimensionNumbers(offset_dims=(ids.ndim,), collapsed_slice_dims=(0,),
                                       start_index_map=(0, 1))
    return lax.gather(view, idx, dnums, slice_sizes=(1, size),
                      mode=lax.GatherScatterMode.CLIP)


def gather_layer_kv(view: jax.Array, fmt: KVFormat, layer,
                    block_ids: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Dequantized K and V of `layer` for each block id.

    Args:
      view: uint32 `[num_blocks, fmt.block_words]`; layer: int or int32 scalar (traced);
      block_ids: int `[...]` (valid ids).
    Returns: (k, v) float32 `[..., tokens_per_block, kv_heads, head_dim]`.
    """
    layer = check_layer(fmt, layer)
    h, t = fmt.num_kv_heads, fmt.tokens_per_block
    lead = block_ids.shape
    rows = 2 * h * t
    data = gather_windows(view, block_ids, layout.data_offset(fmt, layer, 0, 0, 0),
                          rows * fmt.data_words).reshape(*lead, 2, h, t, fmt.data_words)
    if fmt.scale_words:
        scales = gather_windows(view, block_ids, layout.scale_offset(fmt, layer, 0, 0, 0),
                                rows * fmt.scale_words)
        scales = scales.reshape(*lead, 2, h, t, fmt.scale_words)
    else:
        scales = jnp.zeros((*lead, 2, h, t, 0), jnp.uint32)
    x = dequantize_kv_rows(data, scales, fmt.kv_dtype, fmt.head_dim)  # [..., 2, H, T, D]
    x = jnp.moveaxis(x, -2, -3)  # [..., 2, T, H, D]
    return x[..., 0, :, :, :], x[..., 1, :, :, :]

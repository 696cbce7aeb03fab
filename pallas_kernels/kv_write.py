"""KV write: quantize new K/V rows and scatter them into the arena view (XLA).

Each new token contributes, per K|V and kv head, one contiguous row of `data_words` words and
one of `scale_words` words (the block layout keeps a row contiguous), so the write is two
windowed scatters (data, scales) of already-quantized rows. The quantization is elementwise
plus a row reduction and XLA fuses it into the scatter's operand. Under `jit` with the arena
donated, XLA scatters in place (no arena copy; tests/test_arena.py checks the aliasing and the
buffer pointer). A fused Pallas write kernel would save nothing measurable on top of that: the
write moves `N * 2 * kv_heads * row bytes`, tiny next to attention's reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fineserve_jax.formats import KVFormat
from fineserve_jax.formats import kv_layout as layout
from fineserve_jax.formats.kv_codec import quantize_kv_rows
from pallas_kernels.layer_arg import check_layer

__all__ = ["write_kv_view", "scatter_rows", "WRITE_IMPLS"]

WRITE_IMPLS = ("reference", "auto")


def scatter_rows(view: jax.Array, block_ids: jax.Array, starts: jax.Array,
                 rows: jax.Array) -> jax.Array:
    """`view[block_ids[i], starts[i]:starts[i] + w] = rows[i]` for every leading index i.

    Args:
      view: uint32 `[num_blocks, block_words]`; block_ids, starts: int32 `[...]`;
      rows: uint32 `[..., w]`. Out-of-range windows are dropped, never clamped onto another
      block. Duplicate targets (padded tokens all writing the null block) keep one of them.
    """
    idx = jnp.stack([block_ids.astype(jnp.int32), starts.astype(jnp.int32)], axis=-1)
    dnums = lax.ScatterDimensionNumbers(update_window_dims=(rows.ndim - 1,),
                                        inserted_window_dims=(0,),
                                        scatter_dims_to_operand_dims=(0, 1))
    return lax.scatter(view, idx, rows, dnums, indices_are_sorted=False, unique_indices=False,
                       mode=lax.GatherScatterMode.FILL_OR_DROP)


def write_kv_view(view: jax.Array, fmt: KVFormat, layer, k: jax.Array, v: jax.Array,
                  slot_block: jax.Array, slot_offset: jax.Array,
                  impl: str = "reference") -> jax.Array:
    """Quantize and store the K/V of `N` tokens for one layer.

    Args:
      view: uint32 `[num_blocks, fmt.block_words]` (typed arena view).
      layer: int or int32 scalar (traced inside the layer scan).
      k, v: `[N, kv_heads, head_dim]`, any float dtype.
      slot_block: int32 `[N]` block ids (padded tokens: 0, the null block);
      slot_offset: int32 `[N]` token index inside the block.
      impl: "reference" | "auto" (both the fused XLA quantize + in-place scatter).
    Returns: the updated view (same shape and dtype).
    """
    if impl not in WRITE_IMPLS:
        raise ValueError(f"write_kv impl {impl!r} not available; valid: {WRITE_IMPLS}")
    layer = check_layer(fmt, layer)
    n, h, d = k.shape
    if v.shape != k.shape or h != fmt.num_kv_heads or d != fmt.head_dim:
        raise ValueError(f"k {k.shape} / v {v.shape} do not match {fmt.describe()}")
    if view.shape[1:] != (fmt.block_words,) or view.dtype != jnp.uint32:
        raise ValueError(f"view {view.shape} {view.dtype} is not a uint32 view of "
                         f"{fmt.block_words}-word blocks")
    data, scales = quantize_kv_rows(jnp.stack([k, v], axis=1), fmt.kv_dtype)  # [N, 2, H, *]
    kv_idx = jnp.arange(2, dtype=jnp.int32)[None, :, None]
    head = jnp.arange(h, dtype=jnp.int32)[None, None, :]
    tok = slot_offset.astype(jnp.int32)[:, None, None]
    blocks = jnp.broadcast_to(slot_block.astype(jnp.int32)[:, None, None], (n, 2, h))
    view = scatter_rows(view, blocks, layout.data_offset(fmt, layer, kv_idx, head, tok), data)
    if fmt.scale_words:
        view = scatter_rows(view, blocks, layout.scale_offset(fmt, layer, kv_idx, head, tok),
                            scales)
    return view

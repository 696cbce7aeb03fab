"""Word offsets inside one KV block (the layout of `fineserve_jax.formats.KVFormat`).

A block of format `fmt` is `fmt.block_words` uint32 words:

    data   [layers, 2 (K=0, V=1), kv_heads, tokens_per_block, data_words]   then
    scales [layers, 2 (K=0, V=1), kv_heads, tokens_per_block, scale_words]

Every reader and writer (XLA scatter/gather, reference, Pallas kernels) computes addresses
with these functions, so the layout is written down once. They work on Python ints and on
int32 jnp arrays alike (offsets stay < `block_words`, far below 2**31; the block id is kept
separate so that arenas above 2**31 words are addressed through a 2-D view).
"""

from __future__ import annotations

from fineserve_jax.formats.kv_format import KVFormat

__all__ = ["row_index", "data_offset", "scale_offset", "check_layer"]

K, V = 0, 1


def check_layer(fmt: KVFormat, layer: int) -> int:
    if not 0 <= layer < fmt.num_layers:
        raise ValueError(f"layer {layer} out of range for a {fmt.num_layers}-layer KV format")
    return layer


def row_index(fmt: KVFormat, layer, kv, head, token):
    """Row number of (layer, K|V, head, token) inside a block: `[L, 2, H, T]` flattened."""
    return ((layer * 2 + kv) * fmt.num_kv_heads + head) * fmt.tokens_per_block + token


def data_offset(fmt: KVFormat, layer, kv, head, token):
    """Word offset (inside the block) of the first data word of that row."""
    return row_index(fmt, layer, kv, head, token) * fmt.data_words


def scale_offset(fmt: KVFormat, layer, kv, head, token):
    """Word offset (inside the block) of the first scale word of that row."""
    return fmt.data_region_words + row_index(fmt, layer, kv, head, token) * fmt.scale_words

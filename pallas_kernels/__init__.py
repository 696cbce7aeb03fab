"""Attention kernels over the KV arena: decode, prefill, KV write, and their jnp references.

Public interface (one function per operation, implementation chosen by a static `impl`):
  decode_attention(q, kv_view, block_tables, lengths, *, fmt, layer, impl, interpret,
                   num_splits)
  prefill_attention(q, kv_view, block_tables, q_seq, q_pos, *, fmt, layer, impl, interpret)
  write_kv_view(view, fmt, layer, k, v, slot_block, slot_offset, impl)
    (`fineserve_jax.kvslab.arena.write_kv` is the arena-level form)

Files: `layout` (word offsets of the block layout), `kv_unpack` (in-kernel dequantization),
`tile_math` (flash-attention tile arithmetic), `decode_triton`, `prefill_triton` (Pallas
Triton kernels), `reference` (jnp oracle), `kv_gather` / `kv_write` (XLA gather / scatter),
`dispatch` (impl selection), `triton_compat` (JAX version shims).
"""

from pallas_kernels.dispatch import IMPLS, decode_attention, prefill_attention, resolve_impl
from pallas_kernels.kv_write import write_kv_view
from pallas_kernels.reference import (
    decode_attention_reference,
    masked_attention,
    prefill_attention_reference,
)

__all__ = [
    "IMPLS",
    "resolve_impl",
    "decode_attention",
    "prefill_attention",
    "write_kv_view",
    "decode_attention_reference",
    "prefill_attention_reference",
    "masked_attention",
]

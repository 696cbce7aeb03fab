"""Attention kernels over the KV arena: decode, prefill, KV write, and their jnp references.

Public interface (one function per operation, implementation chosen by a static `impl`;
`layer` is an int or a traced int32 scalar, never a compile-time constant of the kernels):
  decode_attention(q, kv_view, block_tables, lengths, *, fmt, layer, impl, interpret,
                   num_splits)
  prefill_attention(q, kv_view, block_tables, q_seq, q_pos, *, fmt, layer, impl, interpret)
  write_kv_view(view, fmt, layer, k, v, slot_block, slot_offset, impl)
    (`fineserve_jax.kvslab.arena.write_kv` is the arena-level form)

Files: `kv_unpack` (in-kernel dequantization), `tile_math` (flash-attention tile
arithmetic), `decode_triton`, `prefill_triton` (Pallas Triton kernels), `query_tiles`
(per-sequence query tiles for prefill), `reference` (jnp oracle), `xla_attention` (the XLA
path that reads only the blocks a step needs), `cpu/` (C++ kernels through XLA's FFI for the
CPU backend: attention, the dense layers' GEMM reading stacked weights in place, SwiGLU),
`kv_gather` / `kv_write` (XLA gather / scatter), `layer_arg` (the layer
argument), `dispatch` (impl selection), `triton_compat` (JAX version shims). The block
layout's word offsets are `fineserve_jax.formats.kv_layout`.
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

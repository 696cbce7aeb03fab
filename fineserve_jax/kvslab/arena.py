"""The device KV arena: one uint32 buffer `[num_slabs, slab_words]` and its typed views.

Imports JAX, so `fineserve_jax.kvslab` (pure Python) does not import it: `from
fineserve_jax.kvslab import arena` explicitly.

A format's *typed view* is the same buffer reshaped to `[num_blocks_fmt, block_words]` (a
bitcast in XLA, no copy). That needs `slab_words % block_words == 0`: then block `i` of slab
`s` is row `s * (slab_words // block_words) + i` of the view, which is exactly the host
allocator's block id. (The host allocator also supports slab sizes with tails for studies;
the device arena does not.) Different formats' views of one arena alias the same memory:
which slab belongs to which format is the allocator's business.

Every updating function returns the new arena; call it under `jit` with the arena donated
(`donate_argnums`) and XLA updates the buffer in place (tests/test_arena.py proves it).
In a step that writes layer l, reads it (attention), then writes layer l+1, the layer l+1
write must data-depend on layer l's reads (in a transformer it does: its K/V come from layer
l's output); two writes with a read of the intermediate arena that nothing orders before the
second write make XLA copy the whole arena to keep that read valid. The engine's step runs
the layers as a `lax.scan` with the arena's typed view in the carry: the body's write updates
the loop buffer in place and its reads follow it (tests/test_model_runner.py checks the
compiled step's aliasing, temporaries and buffer pointer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fineserve_jax.formats import WORD_BYTES, KVFormat
from pallas_kernels.kv_gather import gather_layer_kv
from pallas_kernels.kv_write import write_kv_view

__all__ = [
    "POISON_WORD",
    "make_arena",
    "typed_view",
    "from_view",
    "blocks_per_slab",
    "write_kv",
    "read_kv",
    "copy_blocks",
    "poison_blocks",
]

# All ones: NaN as float32 (every scale word), as both bf16 halves and as all four fp8 bytes,
# so a poisoned block decodes to NaN in every KV dtype (int8/int4 codes are finite, their
# scales are not).
POISON_WORD = 0xFFFFFFFF


def make_arena(num_slabs: int, slab_bytes: int, device=None, parts: int = 1) -> jax.Array:
    """Zero-filled uint32 `[parts * num_slabs, slab_bytes // 4]` on `device` (a device, a
    sharding, or None for the default device).

    `parts` > 1 is the arena of a tensor-parallel group: `device` is then a sharding that
    splits the rows over `parts` devices, so device j holds rows `j * num_slabs ..` as an
    arena of its own (its KV heads of every slab; `slab_bytes` is the per-device slab).
    """
    if num_slabs <= 0 or slab_bytes <= 0 or parts <= 0:
        raise ValueError(f"need positive num_slabs, slab_bytes and parts, got {num_slabs}, "
                         f"{slab_bytes}, {parts}")
    if slab_bytes % WORD_BYTES:
        raise ValueError(f"slab_bytes {slab_bytes} must be a multiple of {WORD_BYTES}")
    if parts > 1 and len(getattr(device, "device_set", ())) != parts:
        raise ValueError(f"an arena of {parts} parts needs a sharding over {parts} devices, "
                         f"got {device!r}")
    # Created on the device(s) directly: a host or default-device copy of a ~100 GiB arena
    # would not fit.
    return jnp.zeros((parts * num_slabs, slab_bytes // WORD_BYTES), jnp.uint32, device=device)


def _check_arena(arena: jax.Array) -> None:
    if arena.ndim != 2 or arena.dtype != jnp.uint32:
        raise ValueError(f"arena must be uint32 [num_slabs, slab_words], got {arena.dtype} "
                         f"{arena.shape}")


def blocks_per_slab(arena_shape, fmt: KVFormat) -> int:
    """Blocks of `fmt` per slab; raises ValueError unless the slab is a whole number of them."""
    slab_words = arena_shape[1]
    if slab_words % fmt.block_words:
        raise ValueError(
            f"slab of {slab_words * WORD_BYTES} B is not a multiple of the {fmt.block_bytes} B "
            f"block of {fmt.describe()}: the device arena needs slab sizes that are common "
            f"multiples of all block sizes (choose_slab_bytes mode 'lcm')")
    return slab_words // fmt.block_words


def typed_view(arena: jax.Array, fmt: KVFormat) -> jax.Array:
    """The arena as uint32 `[num_slabs * blocks_per_slab, fmt.block_words]` (reshape, no copy).

    Row `slab_id * blocks_per_slab + index` is the allocator's block id.
    """
    _check_arena(arena)
    per_slab = blocks_per_slab(arena.shape, fmt)
    return arena.reshape(arena.shape[0] * per_slab, fmt.block_words)


def from_view(view: jax.Array, arena_shape) -> jax.Array:
    """Inverse of `typed_view`: reshape a view back to `[num_slabs, slab_words]`."""
    return view.reshape(tuple(arena_shape))


def write_kv(arena: jax.Array, fmt: KVFormat, layer, k: jax.Array, v: jax.Array,
             slot_block: jax.Array, slot_offset: jax.Array, impl: str = "reference") -> jax.Array:
    """Quantize (fused) and store K/V rows of N tokens for one layer; returns the new arena.

    Args:
      arena: uint32 `[num_slabs, slab_words]`; layer: int or int32 scalar (may be traced).
      k, v: `[N, kv_heads, head_dim]` any float dtype.
      slot_block: int32 `[N]` block ids (padded tokens -> 0, the null block: harmless);
      slot_offset: int32 `[N]` token index within the block.
    See `pallas_kernels.kv_write.write_kv_view`.
    """
    view = write_kv_view(typed_view(arena, fmt), fmt, layer, k, v, slot_block, slot_offset,
                         impl=impl)
    return from_view(view, arena.shape)


def read_kv(arena: jax.Array, fmt: KVFormat, layer, block_ids: jax.Array):
    """Dequantized (k, v), float32 `[n_blocks, tokens_per_block, kv_heads, head_dim]` each
    (reference / debugging)."""
    return gather_layer_kv(typed_view(arena, fmt), fmt, layer, jnp.asarray(block_ids))


def copy_blocks(arena: jax.Array, fmt: KVFormat, src_block_ids: jax.Array,
                dst_block_ids: jax.Array) -> jax.Array:
    """Copy whole blocks `src[i] -> dst[i]` (compaction). All sources are read before any
    destination is written. Returns the new arena (in place when donated)."""
    view = typed_view(arena, fmt)
    src = jnp.asarray(src_block_ids, jnp.int32)
    dst = jnp.asarray(dst_block_ids, jnp.int32)
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError(f"src {src.shape} and dst {dst.shape} must be equal 1-D shapes")
    view = view.at[dst].set(view[src], mode="drop")
    return from_view(view, arena.shape)


def poison_blocks(arena: jax.Array, fmt: KVFormat, block_ids: jax.Array,
                  value: int = POISON_WORD) -> jax.Array:
    """Fill whole blocks with `value` (default: NaN in every KV dtype). Debug mode poisons
    freed blocks with it; isolation tests poison every block a sequence does not own."""
    view = typed_view(arena, fmt)
    ids = jnp.asarray(block_ids, jnp.int32)
    view = view.at[ids].set(jnp.uint32(value), mode="drop")
    return from_view(view, arena.shape)

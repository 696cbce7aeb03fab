"""Synthetic KV contents for the benchmarks: finite random words of a block format."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fineserve_jax.formats import KVFormat


def random_view(fmt: KVFormat, num_blocks: int, key) -> jax.Array:
    """A `[num_blocks, block_words]` view of finite random KV (no quantization pass: random
    codes with the exponent's top bit cleared, so |x| < 2 and no NaN code; constant scales)."""
    mask = {"bf16": 0xBFFFBFFF, "fp8": 0xBFBFBFBF, "int8": 0xFFFFFFFF, "int4": 0xFFFFFFFF}
    data = jax.random.bits(key, (num_blocks, fmt.data_region_words), jnp.uint32)
    data = data & jnp.uint32(mask[fmt.kv_dtype])
    if fmt.scale_words == 0:
        return data
    scale = {"fp8": [0.01], "int8": [0.01], "int4": [0.1, -0.75]}[fmt.kv_dtype]
    row = jax.lax.bitcast_convert_type(jnp.asarray(scale, jnp.float32), jnp.uint32)
    scales = jnp.broadcast_to(jnp.tile(row, fmt.rows_per_block),
                              (num_blocks, fmt.rows_per_block * fmt.scale_words))
    return jnp.concatenate([data, scales], axis=1)

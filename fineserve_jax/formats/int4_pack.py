"""Two unsigned 4-bit values per byte: the storage of int4 weights.

Layout: along the packed axis, element `2i` goes in the LOW nibble of byte `i` and element
`2i + 1` in the HIGH nibble (little-endian, the same convention as the KV words in
`fineserve_jax.formats`). We pack into `uint8` explicitly rather than rely on `jnp.int4`,
whose in-memory packing is backend-dependent (XLA CPU stores one int4 per byte), so the
bytes `Model.param_bytes` reports are the bytes stored everywhere.

Both functions are jnp-traceable (usable under `jit` / `nnx.eval_shape`) and accept numpy
arrays too.
"""

from __future__ import annotations

import jax.numpy as jnp


def pack_int4(q, axis: int = 0):
    """Pack unsigned nibbles along `axis`.

    q: integer array with values in [0, 15], even length along `axis` -> uint8 array of
    half that length along `axis` (byte i = q[2i] | q[2i+1] << 4).
    """
    q = jnp.asarray(q)
    axis = axis % q.ndim
    if q.shape[axis] % 2:
        raise ValueError(f"int4 packing needs an even length along axis {axis}, got {q.shape}")
    q = jnp.moveaxis(q.astype(jnp.uint8), axis, 0)
    lo, hi = q[0::2], q[1::2]
    packed = (lo & 0xF) | ((hi & 0xF) << 4)
    return jnp.moveaxis(packed.astype(jnp.uint8), 0, axis)


def unpack_int4(packed, axis: int = 0):
    """Inverse of `pack_int4`: uint8 [.., n, ..] -> uint8 nibbles [.., 2n, ..] in [0, 15]."""
    packed = jnp.asarray(packed)
    axis = axis % packed.ndim
    p = jnp.moveaxis(packed.astype(jnp.uint8), axis, 0)
    lo = p & 0xF
    hi = p >> 4
    # Interleave: [n, 2, ...] -> [2n, ...] puts lo at even and hi at odd positions.
    q = jnp.stack([lo, hi], axis=1).reshape((2 * p.shape[0],) + p.shape[1:])
    return jnp.moveaxis(q, 0, axis)

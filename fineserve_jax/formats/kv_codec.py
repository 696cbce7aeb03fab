"""KV row quantization: float rows <-> the packed uint32 words of the KV block layout.

One *row* is the `head_dim` values of one (layer, K|V, kv head, token). A row is stored as
`data_words = head_dim * bits / 32` uint32 words (little-endian inside a word: element 0 in
the low bits, which is what `lax.bitcast_convert_type` does) plus `scale_words` float32 words
(see `fineserve_jax.formats`). These jnp functions are the storage format's definition: the
arena's `write_kv` stores what `quantize_kv_rows` returns, the reference attention reads with
`dequantize_kv_rows`, and the Pallas kernels re-implement the unpacking with shifts and masks
(`pallas_kernels.kv_unpack`) and are tested against this.

Error bounds per element `x` of a row with `amax = max|row|`, `lo, hi = min, max of row`
(checked by tests/test_kv_quant.py):
  bf16: `|x - deq| <= 2^-8 |x|` (round to nearest, 7 mantissa bits); bf16 inputs are
        stored exactly.
  fp8:  e4m3fn with `scale = amax / 448`: `|x - deq| <= 2^-4 |x| + 2^-10 scale`
        (3 mantissa bits; the second term covers the subnormal range), so <= 2^-4 amax.
        Values are clipped to +-448 before the cast: a plain cast of 448.0001 gives NaN.
  int8: symmetric, `scale = amax / 127`, round to nearest: `|x - deq| <= amax / 254`.
  int4: asymmetric, `scale = (hi - lo) / 15`, `zero = lo`, unsigned nibbles:
        `|x - deq| <= (hi - lo) / 30`.
Plus float32 rounding of the scale arithmetic (a few ulps of amax). A zero row has scale 0
and dequantizes to exact zeros (the division uses a safe divisor, never 0/0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fineserve_jax.formats.kv_format import (
    FP8_E4M3_MAX,
    INT4_LEVELS,
    INT8_QMAX,
    KV_BITS,
    KV_SCALE_WORDS,
    check_kv_dtype,
)

__all__ = ["quantize_kv_rows", "dequantize_kv_rows", "pack_narrow", "unpack_narrow"]


def pack_narrow(x: jax.Array) -> jax.Array:
    """Pack `[..., n]` 8/16-bit values into `[..., n * bits / 32]` uint32 words (little-endian)."""
    per_word = 4 // x.dtype.itemsize
    x = x.reshape(*x.shape[:-1], x.shape[-1] // per_word, per_word)
    return lax.bitcast_convert_type(x, jnp.uint32)


def unpack_narrow(words: jax.Array, dtype) -> jax.Array:
    """Inverse of `pack_narrow`: `[..., w]` uint32 -> `[..., w * 32 / bits]` of `dtype`."""
    x = lax.bitcast_convert_type(words, dtype)  # [..., w, per_word]
    return x.reshape(*words.shape[:-1], -1)


def _safe_div(x, d):
    # A zero row has scale 0; dividing by 1 instead keeps its codes at 0 (no 0/0 NaN).
    return x / jnp.where(d > 0, d, 1.0)


def quantize_kv_rows(x: jax.Array, kv_dtype: str):
    """Quantize rows for storage.

    Args:
      x: `[..., head_dim]` any float dtype.
      kv_dtype: "bf16" | "fp8" | "int8" | "int4".
    Returns:
      (data_words uint32 `[..., head_dim * bits / 32]`,
       scale_words uint32 `[..., scale_words]`: float32 bits of (scale) or (scale, zero);
       `[..., 0]` for bf16).
    """
    check_kv_dtype(kv_dtype)
    head_dim = x.shape[-1]
    if head_dim % (32 // KV_BITS[kv_dtype]):
        raise ValueError(f"head_dim {head_dim} does not fill whole words for {kv_dtype}")
    lead = x.shape[:-1]
    if kv_dtype == "bf16":
        data = pack_narrow(lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16))
        return data, jnp.zeros((*lead, 0), jnp.uint32)

    xf = x.astype(jnp.float32)
    if kv_dtype in ("fp8", "int8"):
        amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
        qmax = FP8_E4M3_MAX if kv_dtype == "fp8" else INT8_QMAX
        scale = amax / qmax
        y = jnp.clip(_safe_div(xf, scale), -qmax, qmax)  # clip first: rounding may exceed qmax
        if kv_dtype == "fp8":
            codes = lax.bitcast_convert_type(y.astype(jnp.float8_e4m3fn), jnp.uint8)
        else:
            codes = lax.bitcast_convert_type(jnp.round(y).astype(jnp.int8), jnp.uint8)
        data = pack_narrow(codes)
        scales = scale
    else:  # int4: asymmetric, unsigned nibbles
        lo = jnp.min(xf, axis=-1, keepdims=True)
        hi = jnp.max(xf, axis=-1, keepdims=True)
        scale = (hi - lo) / INT4_LEVELS
        nib = jnp.clip(jnp.round(_safe_div(xf - lo, scale)), 0, INT4_LEVELS).astype(jnp.uint32)
        nib = nib.reshape(*lead, head_dim // 8, 8)
        shifts = jnp.arange(8, dtype=jnp.uint32) * 4
        # Nibbles occupy disjoint bits, so the sum is the bitwise or.
        data = jnp.sum(nib << shifts, axis=-1, dtype=jnp.uint32)
        scales = jnp.concatenate([scale, lo], axis=-1)
    return data, lax.bitcast_convert_type(scales, jnp.uint32)


def dequantize_kv_rows(data_words: jax.Array, scale_words: jax.Array, kv_dtype: str,
                       head_dim: int) -> jax.Array:
    """Inverse of `quantize_kv_rows`.

    Args:
      data_words: uint32 `[..., head_dim * bits / 32]`.
      scale_words: uint32 `[..., KV_SCALE_WORDS[kv_dtype]]`.
    Returns: float32 `[..., head_dim]`.
    """
    check_kv_dtype(kv_dtype)
    lead = data_words.shape[:-1]
    if scale_words.shape[-1] != KV_SCALE_WORDS[kv_dtype]:
        raise ValueError(f"{kv_dtype} rows need {KV_SCALE_WORDS[kv_dtype]} scale words, got "
                         f"{scale_words.shape[-1]}")
    if kv_dtype == "bf16":
        x = unpack_narrow(data_words, jnp.bfloat16).astype(jnp.float32)
    else:
        scales = lax.bitcast_convert_type(scale_words, jnp.float32)
        if kv_dtype == "fp8":
            x = unpack_narrow(data_words, jnp.float8_e4m3fn).astype(jnp.float32) * scales
        elif kv_dtype == "int8":
            x = unpack_narrow(data_words, jnp.int8).astype(jnp.float32) * scales
        else:
            shifts = jnp.arange(8, dtype=jnp.uint32) * 4
            nib = (data_words[..., None] >> shifts) & 0xF  # [..., words, 8]
            nib = nib.reshape(*lead, -1).astype(jnp.float32)
            x = nib * scales[..., 0:1] + scales[..., 1:2]
    if x.shape[-1] != head_dim:
        raise ValueError(f"data words hold {x.shape[-1]} elements, expected head_dim {head_dim}")
    return x

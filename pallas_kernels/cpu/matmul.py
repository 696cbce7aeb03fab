"""GEMMs with one layer of stacked weights read in place (`stacked_matmul.cc`).

Inside the decoder's layer scan, `x @ w[layer]` makes XLA copy layer i's slice of the
stacked weights before its dot; on a CPU, where a decode step streams every weight from
memory, that copy is a second and third pass over them. `stacked_matmul_cpu` reads the slice
where it lies. Float32 only (other dtypes take `x @ w[layer]`); each output row is one fixed
sum over k, so results do not depend on the batch.

`quant_matmul_cpu` does the same for the quantized weight formats of
`models/quant_linear.py`, dequantizing on the fly: XLA would build the layer's dequantized
[K, N] matrix first, and compiling that (with the row-blocked GEMM around it) was most of a
quantized model's step compile time.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu.build import quant_matmul_target, stacked_matmul_target

__all__ = ["stacked_matmul_cpu", "stacked_matmul_reference", "QUANT_FORMATS",
           "quant_matmul_cpu", "quant_matmul_reference", "dequantized_layer"]

# format -> the kernel's `format` attribute (stacked_matmul.cc's Format)
QUANT_FORMATS = {"fp8": 1, "int8": 2, "int4": 3, "w4a8": 4}


def stacked_matmul_reference(x: jax.Array, stacked: jax.Array, layer) -> jax.Array:
    """x `[..., K]`, stacked `[layers, K, N]`, layer int32 scalar -> `[..., N]` float32
    (XLA's dot of the layer's slice: the copy this module avoids)."""
    return jnp.einsum("...k,kn->...n", x, stacked[layer].astype(x.dtype),
                      preferred_element_type=jnp.float32)


def stacked_matmul_cpu(x: jax.Array, stacked: jax.Array, layer,
                       defines: Tuple[str, ...] = ()) -> jax.Array:
    """x `[..., K]`, stacked `[layers, K, N]`, layer int or int32 scalar (traced; out of
    range is an error) -> `[..., N]` float32. Anything but float32 x and weights goes
    through `stacked_matmul_reference`. `defines`: build macros (tests build mutants)."""
    if stacked.ndim != 3 or x.shape[-1] != stacked.shape[1]:
        raise ValueError(f"stacked_matmul: x {x.shape} and stacked {stacked.shape} are not "
                         f"[..., K] and [layers, K, N]")
    if x.dtype != jnp.float32 or stacked.dtype != jnp.float32:
        return stacked_matmul_reference(x, stacked, layer)
    call = jax.ffi.ffi_call(stacked_matmul_target(defines),
                            jax.ShapeDtypeStruct(x.shape[:-1] + stacked.shape[2:], jnp.float32))
    return call(x, stacked, jnp.asarray(layer, jnp.int32))


def _check_quant(x, weight, fmt, scale, zero, group_scale) -> int:
    """Validates the operands of a quantized GEMM; returns K."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"quant_matmul: unknown format {fmt!r}; formats: {', '.join(QUANT_FORMATS)}")
    packed = fmt in ("int4", "w4a8")
    if weight.ndim != 3 or x.shape[-1] != weight.shape[1] * (2 if packed else 1):
        raise ValueError(f"quant_matmul ({fmt}): x {x.shape} and weight {weight.shape} are not "
                         f"[..., K] and [layers, {'K/2' if packed else 'K'}, N]")
    need = {"fp8": (), "int8": ("scale",), "int4": ("scale", "zero"),
            "w4a8": ("zero", "group_scale")}[fmt]
    given = {"scale": scale, "zero": zero, "group_scale": group_scale}
    for name in need:
        a = given[name]
        if a is None or a.ndim != 3 or a.shape[0] != weight.shape[0] or a.shape[2] != weight.shape[2]:
            raise ValueError(f"quant_matmul ({fmt}): {name} must be [layers, G, N] "
                             f"{(weight.shape[0], 'G', weight.shape[2])}, got "
                             f"{None if a is None else a.shape}")
        if x.shape[-1] % a.shape[1]:
            raise ValueError(f"quant_matmul ({fmt}): {a.shape[1]} groups do not divide K = {x.shape[-1]}")
    return x.shape[-1]


def dequantized_layer(weight: jax.Array, layer, fmt: str, scale: Optional[jax.Array] = None,
                      zero: Optional[jax.Array] = None,
                      group_scale: Optional[jax.Array] = None) -> jax.Array:
    """Layer `layer` of quantized stacked weights as float32 [K, N] (w4a8: its int8 values).

    weight: fp8 e4m3fn / int8 [layers, K, N], or uint8 [layers, K/2, N] with rows 2i and
    2i + 1 in the low and high nibbles of byte row i (int4, w4a8); scale float32, zero and
    group_scale uint8, each [layers, G, N], row k in group k // (K / G):
      fp8  w             int8  w * scale          int4  (w - zero) * scale
      w4a8 (w - zero) * group_scale, whole numbers
    """
    w = weight[layer]
    if fmt in ("int4", "w4a8"):
        w = jnp.stack([w & 15, w >> 4], axis=1).reshape(2 * w.shape[0], w.shape[1])
    w = w.astype(jnp.float32)
    if fmt == "fp8":
        return w

    def rows(a):  # [G, N] -> [K, N]
        return jnp.repeat(a[layer].astype(jnp.float32), w.shape[0] // a.shape[1], axis=0)

    if fmt == "int8":
        return w * rows(scale)
    if fmt == "int4":
        return (w - rows(zero)) * rows(scale)
    return (w - rows(zero)) * rows(group_scale)


def quant_matmul_reference(x: jax.Array, weight: jax.Array, layer, *, fmt: str,
                           scale: Optional[jax.Array] = None, zero: Optional[jax.Array] = None,
                           group_scale: Optional[jax.Array] = None) -> jax.Array:
    """`quant_matmul_cpu`'s result by XLA: x @ `dequantized_layer(...)` (w4a8: an int8 x int8
    -> int32 GEMM, exact)."""
    _check_quant(x, weight, fmt, scale, zero, group_scale)
    w = dequantized_layer(weight, layer, fmt, scale, zero, group_scale)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    if fmt == "w4a8":
        return jax.lax.dot_general(x.astype(jnp.int8), w.astype(jnp.int8), dims,
                                   preferred_element_type=jnp.int32)
    return jax.lax.dot_general(x.astype(jnp.float32), w, dims,
                               preferred_element_type=jnp.float32)


def quant_matmul_cpu(x: jax.Array, weight: jax.Array, layer, *, fmt: str,
                     scale: Optional[jax.Array] = None, zero: Optional[jax.Array] = None,
                     group_scale: Optional[jax.Array] = None,
                     defines: Tuple[str, ...] = ()) -> jax.Array:
    """x float32 `[..., K]` @ layer `layer` (int32 scalar, traced; out of range is an
    error) of quantized stacked weights (`dequantized_layer` has the formats), read in place.

    fmt "fp8" (x: fp8 values as float32), "int8", "int4" (x: float32) -> float32 `[..., N]`;
    "w4a8" (x: int8 values as float32) -> the exact int32 `[..., N]` (exact while |x| and
    |(w - zero) * group_scale| are <= 127, as QoQ builds them). Each float output is
    one sum in increasing k (batch-invariant). Non-float32 x goes through
    `quant_matmul_reference`. `defines`: build macros (tests build mutants)."""
    _check_quant(x, weight, fmt, scale, zero, group_scale)
    if x.dtype != jnp.float32:
        return quant_matmul_reference(x, weight, layer, fmt=fmt, scale=scale, zero=zero,
                                      group_scale=group_scale)
    unused = jnp.zeros((1, 1, 1), jnp.uint8)
    out = jnp.int32 if fmt == "w4a8" else jnp.float32
    call = jax.ffi.ffi_call(quant_matmul_target(defines),
                            jax.ShapeDtypeStruct(x.shape[:-1] + weight.shape[2:], out))
    return call(x, weight,
                jnp.zeros((1, 1, 1), jnp.float32) if scale is None else scale,
                unused if zero is None else zero, unused if group_scale is None else group_scale,
                jnp.asarray(layer, jnp.int32), format=np.int32(QUANT_FORMATS[fmt]))

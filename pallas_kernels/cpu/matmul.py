"""A GEMM with one layer of stacked weights read in place (`stacked_matmul.cc`).

Inside the decoder's layer scan, `x @ w[layer]` makes XLA copy layer i's slice of the
stacked weights before its dot; on a CPU, where a decode step streams every weight from
memory, that copy is a second and third pass over them. `stacked_matmul_cpu` reads the slice
where it lies. Float32 only (other dtypes take `x @ w[layer]`); each output row is one fixed
sum over k, so results do not depend on the batch.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from pallas_kernels.cpu.build import stacked_matmul_target

__all__ = ["stacked_matmul_cpu", "stacked_matmul_reference"]


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

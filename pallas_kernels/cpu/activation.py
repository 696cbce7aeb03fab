"""The SwiGLU activation, silu(gate) * up, through the C++ CPU kernel (`swiglu.cc`).

XLA's CPU fusion of `jax.nn.silu(g) * u` inside the decoder's layer scan costs several ns
per element; the kernel's vectorized exp takes a fraction of that. Float32 only (other
dtypes take the reference); results agree with the reference to a few ulp.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from pallas_kernels.cpu.build import swiglu_target

__all__ = ["swiglu_cpu", "swiglu_reference"]


def swiglu_reference(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up in plain JAX (any dtype; the shapes match)."""
    return jax.nn.silu(gate) * up


def swiglu_cpu(gate: jax.Array, up: jax.Array, defines: Tuple[str, ...] = ()) -> jax.Array:
    """gate, up `[...]` of one shape -> silu(gate) * up `[...]`. Anything but float32 goes
    through `swiglu_reference`. `defines`: build macros (tests build mutants)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {gate.shape} and up {up.shape} differ in shape")
    if gate.dtype != jnp.float32 or up.dtype != jnp.float32:
        return swiglu_reference(gate, up)
    call = jax.ffi.ffi_call(swiglu_target(defines), jax.ShapeDtypeStruct(gate.shape, jnp.float32))
    return call(gate, up)

"""Fast implementations a backend lends the decoder's layer body.

The model's math is plain JAX; a backend with its own kernels for the dense parts (the C++
CPU kernels, impl "cpu") passes them to `Transformer.__call__` as a `LayerKernels`, and the
layer body calls them where given. The layer scan itself does not change.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax

__all__ = ["LayerKernels", "swiglu"]


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up (any dtype; one shape): the MLP's activation in plain JAX."""
    return jax.nn.silu(gate) * up


@dataclasses.dataclass(frozen=True)
class LayerKernels:
    """stacked_matmul(x [..., in], stacked [layers, in, out], layer int32) -> [..., out]
    float32: multiplies the dense layers by their layer of the stacked kernels in place,
    instead of by the slice the scan would copy out (None: XLA's dot of the slice).
    quant_matmul(x [..., in] float32, weight [layers, ...] stored, layer int32, *, fmt,
    scale / zero / group_scale [layers, G, out]) -> [..., out] (float32; int32 for "w4a8"):
    the same for the quantized layers (`QuantLinear.kernel_format`), dequantizing on the fly
    (None: the layers' XLA path on their slices).
    swiglu(gate [...], up [...]) -> silu(gate) * up (None: `swiglu` above)."""

    stacked_matmul: Optional[Callable] = None
    quant_matmul: Optional[Callable] = None
    swiglu: Optional[Callable] = None

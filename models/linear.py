"""The dense linear layer. Quantized variants live in `models/quant_linear.py`.

Every linear layer exposes the same call, `y[..., out] = layer(x[..., in])`, so the model
code is identical for every precision preset; only the weight container and its matmul
differ.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class StackedKernel:
    """Layer `index` of stacked kernels, not sliced: what a `Linear` (or a quantized layer's
    `weight`) inside the decoder's layer scan holds when the caller can multiply by a layer
    of the stack in place.

    stacked [layers, in, out] (a quantized layer: its stored weights); index int32 scalar
    (traced); operands: the other stacked arrays the product reads (a quantized layer's
    scales and zeros, by the matmul's argument names); matmul(x [..., in], stacked, index,
    **operands) -> [..., out]. Any other read of the kernel (`kernel[...]`) takes the
    slice, as before."""

    stacked: jax.Array
    index: jax.Array
    matmul: Callable
    operands: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)

    def product(self, x: jax.Array) -> jax.Array:
        """x [..., in] times layer `index` of the stack, read in place."""
        return self.matmul(x, self.stacked, self.index, **self.operands)

    def __getitem__(self, key):
        return self.stacked[self.index][key]


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel [in, out] stored in the model dtype."""

    weight_format = "dense"

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        std = in_features ** -0.5
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = nnx.Param(
            (jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32) * std
             ).astype(dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel.get_value()
        if isinstance(kernel, StackedKernel):
            y = kernel.product(x).astype(x.dtype)
        else:
            y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype),
                           preferred_element_type=jnp.float32).astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y

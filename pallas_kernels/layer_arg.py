"""The layer argument of every arena operation: a Python int or a traced int32 scalar.

Inside the decoder's layer scan the layer index is a traced value, so every operation takes
it as data (the Pallas kernels as a one-element input array), never as a compile-time
constant: one compiled layer body serves every layer. A Python int is range-checked here; a
traced index cannot be, and the model's scan only produces indices in range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fineserve_jax.formats import KVFormat

__all__ = ["check_layer"]


def check_layer(fmt: KVFormat, layer):
    """`layer` as given (int) or as an int32 scalar array; raises ValueError if it is out of
    range (ints) or not an integer scalar (arrays)."""
    if isinstance(layer, (int,)) and not isinstance(layer, bool):
        if not 0 <= layer < fmt.num_layers:
            raise ValueError(f"layer {layer} out of range for a {fmt.num_layers}-layer KV "
                             f"format")
        return layer
    if isinstance(layer, (jax.Array, jnp.ndarray)) or hasattr(layer, "dtype"):
        if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
            raise ValueError(f"layer must be an int or an integer scalar array, got "
                             f"{jnp.result_type(layer)} of shape {jnp.shape(layer)}")
        return jnp.asarray(layer, jnp.int32)
    raise ValueError(f"layer must be an int or an integer scalar array, got "
                     f"{type(layer).__name__}")

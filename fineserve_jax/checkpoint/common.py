"""What every checkpoint reader shares: the error type and the dtype names."""

from __future__ import annotations

import jax.numpy as jnp


class CheckpointError(ValueError):
    """A checkpoint directory the framework cannot load faithfully."""


def parse_dtype(dtype) -> jnp.dtype:
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"unsupported dtype {dtype!r}; valid: {', '.join(names)}")
        return names[dtype]
    return jnp.dtype(dtype)

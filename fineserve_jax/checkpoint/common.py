"""What every checkpoint reader shares: the error type, dtype names, the layer-count check."""

from __future__ import annotations

import re
from typing import Iterable

import jax.numpy as jnp


class CheckpointError(ValueError):
    """A checkpoint the framework cannot load faithfully; the message names the file and, where
    it applies, the tensor or config field."""


def parse_dtype(dtype) -> jnp.dtype:
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"unsupported dtype {dtype!r}; valid: {', '.join(names)}")
        return names[dtype]
    return jnp.dtype(dtype)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_layer_count(names: Iterable[str], cfg, where: str,
                      field: str = "num_hidden_layers") -> None:
    """The checkpoint's layers (HF names `model.layers.{i}.*`) must be exactly 0..num_layers-1.

    A config that names fewer layers than the checkpoint holds would silently drop layers;
    more is caught by `build_model` as a missing tensor, but is reported here first with the
    counts. Raises `CheckpointError` naming `where` and the config `field`.
    """
    present = set()
    for n in names:
        m = _LAYER.match(n)
        if m:
            present.add(int(m.group(1)))
    if not present:
        return
    found = max(present) + 1
    if found != cfg.num_layers:
        raise CheckpointError(
            f"{where}: the config's {field} is {cfg.num_layers} but the checkpoint holds "
            f"{found} layers (model.layers.0..{found - 1}); refusing to "
            f"{'drop' if found > cfg.num_layers else 'invent'} layers")
    missing = sorted(set(range(found)) - present)
    if missing:
        raise CheckpointError(f"{where}: the checkpoint has no tensors for layer(s) "
                              f"{missing[:8]} of {found}")

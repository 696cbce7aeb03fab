"""Orbax save/restore of every array of a (quantized) model."""

from __future__ import annotations

import os

import jax
from flax import nnx

from fineserve_jax.checkpoint.common import CheckpointError


def save_params(model: nnx.Module, directory: str) -> None:
    """Save every array of `model` (quantized containers included) with orbax."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, nnx.to_pure_dict(state), force=True)


def restore_params(model: nnx.Module, directory: str) -> nnx.Module:
    """Restore arrays saved by `save_params` into a model of the same structure.

    `model` may be abstract (`nnx.eval_shape`); the restored model is returned.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such orbax checkpoint directory")
    graphdef, state = nnx.split(model)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(directory, target)
    except Exception as e:  # tensorstore/orbax raise bare Exceptions with pages of spec text
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{directory}: orbax checkpoint could not be restored "
                              f"({type(e).__name__}: {first}); a data file is damaged or the "
                              f"checkpoint was saved from a model of another structure") from None
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)

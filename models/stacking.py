"""Stacked layers: one NNX module whose every array has a leading layer axis.

The decoder keeps its `num_layers` layers as ONE `DecoderLayer` whose parameters are stacked
(`[layers, ...]`), so the forward is a `lax.scan` over them: one compiled layer body whatever
the depth. Only the arrays are stacked; the module structure (and static attributes such as
`in_features`) is the same for every layer, which is what a scan needs.

`stack_modules` builds such a module by running a per-layer constructor over stacked inputs
under `jax.jit(jax.vmap(...))`: one compiled program per call. (Eagerly, op by op, every
primitive of the constructor compiled on its own: measured on the 2-core box, quantizing
tiny-qwen2 to qoq took 288 backend compiles and ~50 s under load.) It also works under
`nnx.eval_shape`. Its temporaries are `layers` times one layer's; building never holds a
second copy of the stacked result. `layer_slice` takes one layer back
out as an ordinary module (a copy of the slices: for calibration and inspection).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

__all__ = ["stack_modules", "layer_slice", "stacked_depth"]


def stack_modules(build: Callable[..., nnx.Module], xs: Any) -> nnx.Module:
    """The module `build(*x)` for every slice `x` of `xs` along axis 0, stacked.

    xs: a tuple of pytrees whose leaves share a leading axis `[layers, ...]` (None leaves are
    allowed: they stay None). Every `build` call must give the same module structure.
    Returns a module of that structure whose arrays are `[layers, ...]`.
    """
    graphdefs = []

    def one(x):
        graphdef, state = nnx.split(build(*x))
        graphdefs.append(graphdef)  # static: the same on every (traced) call
        return state

    states = jax.jit(jax.vmap(one))(tuple(xs))
    return nnx.merge(graphdefs[0], states)


def layer_slice(module: nnx.Module, i) -> nnx.Module:
    """Layer `i` of a stacked module, as a module of per-layer arrays (a copy)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def stacked_depth(module: nnx.Module) -> int:
    """The length of the leading (layer) axis shared by the module's arrays."""
    leaves = jax.tree.leaves(nnx.state(module))
    if not leaves:
        raise ValueError("a stacked module needs at least one array")
    return int(leaves[0].shape[0])

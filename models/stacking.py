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
second copy of the stacked result. It is compiled with the project's
options (`compile_options.jit_with_options`). `layer_slice` takes one layer back
out as an ordinary module (a copy of the slices: for calibration and inspection).
`with_stacked_kernels` lets the dense layers of one scan step multiply by their layer of the
stack in place instead of by the slice the scan copies out.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import jax
from flax import nnx

from models.compile_options import jit_with_options
from models.linear import Linear, StackedKernel

__all__ = ["stack_modules", "layer_slice", "stacked_depth", "dense_kernel_paths",
           "with_stacked_kernels"]


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

    states = jit_with_options(jax.vmap(one))(tuple(xs))
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


def dense_kernel_paths(module: nnx.Module) -> Tuple[tuple, ...]:
    """State paths of the kernels of every dense `Linear` in `module` (not the quantized
    formats, whose weights are not plain matrices)."""
    return tuple(path + ("kernel",) for path, m in nnx.iter_modules(module)
                 if type(m) is Linear)


def with_stacked_kernels(layer_params: nnx.State, stacked_params: nnx.State,
                         paths: Sequence[tuple], index: jax.Array,
                         matmul: Callable) -> nnx.State:
    """`layer_params` (one scan step's slices) with the kernel at each of `paths` replaced by
    a `StackedKernel` of `stacked_params`' array there, layer `index`. The slices replaced
    are then unused, so XLA drops their copies. Changes `layer_params` in place; returns it."""
    for path in paths:
        layer_node, stacked_node = layer_params, stacked_params
        for key in path[:-1]:
            layer_node, stacked_node = layer_node[key], stacked_node[key]
        leaf = layer_node[path[-1]]
        layer_node[path[-1]] = leaf.replace(
            value=StackedKernel(stacked_node[path[-1]][...], index, matmul))
    return layer_params

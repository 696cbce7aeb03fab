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
`with_stacked_kernels` lets the dense and quantized layers of one scan step multiply by their
layer of the stack in place instead of by the slice the scan copies out (`in_place_weights`
says which, given a backend's kernels).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence, Tuple

import jax
from flax import nnx

from models.compile_options import jit_with_options
from models.linear import Linear, StackedKernel
from models.quant_linear import QuantLinear

__all__ = ["stack_modules", "layer_slice", "stacked_depth", "InPlaceWeight",
           "in_place_weights", "with_stacked_kernels"]


# (key, input structure and shapes) -> (compiled build, its graphdef), most recent last
_SHARED: "collections.OrderedDict[Hashable, Tuple[Callable, list]]" = collections.OrderedDict()
_SHARED_MAX = 64


def stack_modules(build: Callable[..., nnx.Module], xs: Any,
                  key: Optional[Hashable] = None) -> nnx.Module:
    """The module `build(*x)` for every slice `x` of `xs` along axis 0, stacked.

    xs: a tuple of pytrees whose leaves share a leading axis `[layers, ...]` (None leaves are
    allowed: they stay None). Every `build` call must give the same module structure.
    Returns a module of that structure whose arrays are `[layers, ...]`.
    key: a caller whose `build` computes one function of its inputs per key passes it;
    calls of one key with inputs of one shape then share one compiled program (a model's
    projections of one shape, quantized: q and o, k and v, gate and up). None: its own.
    """
    shapes = (key, jax.tree.structure(xs),
              tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(xs)))
    if key is not None and shapes in _SHARED:
        _SHARED.move_to_end(shapes)
        program, graphdefs = _SHARED[shapes]
    else:
        graphdefs = []

        def one(x):
            graphdef, state = nnx.split(build(*x))
            graphdefs.append(graphdef)  # static: the same on every (traced) call
            return state

        program = jit_with_options(jax.vmap(one))
        if key is not None:
            _SHARED[shapes] = (program, graphdefs)
            while len(_SHARED) > _SHARED_MAX:
                _SHARED.popitem(last=False)
    states = program(tuple(xs))
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


@dataclasses.dataclass(frozen=True)
class InPlaceWeight:
    """One layer of a stacked module whose weight a kernel reads in place: the module at
    state `path`, its stacked `weight` attribute, the `matmul` (`StackedKernel.matmul`) and
    its other operands (matmul argument -> the module's stacked attribute)."""

    path: tuple
    weight: str
    matmul: Callable
    operands: Mapping[str, str]


def in_place_weights(module: nnx.Module, dense_matmul: Optional[Callable],
                     quant_matmul: Optional[Callable]) -> Tuple[InPlaceWeight, ...]:
    """The layers of a stacked `module` a backend's kernels multiply in place: every dense
    `Linear` by `dense_matmul(x, kernel, index)`, every quantized layer by
    `quant_matmul(x, weight, index, fmt=..., **operands)` (None: that kind stays XLA's)."""
    found = []
    for path, m in nnx.iter_modules(module):
        if type(m) is Linear and dense_matmul is not None:
            found.append(InPlaceWeight(path, "kernel", dense_matmul, {}))
        elif isinstance(m, QuantLinear) and quant_matmul is not None:
            found.append(InPlaceWeight(path, "weight",
                                       functools.partial(quant_matmul, fmt=m.kernel_format),
                                       dict(m.kernel_operands)))
    return tuple(found)


def with_stacked_kernels(layer_params: nnx.State, stacked_params: nnx.State,
                         weights: Sequence[InPlaceWeight], index: jax.Array) -> nnx.State:
    """`layer_params` (one scan step's slices) with each of `weights` replaced by a
    `StackedKernel` of `stacked_params`' arrays there, layer `index`. The slices replaced
    are then unused, so XLA drops their copies. Changes `layer_params` in place; returns it."""
    for w in weights:
        layer_node, stacked_node = layer_params, stacked_params
        for key in w.path:
            layer_node, stacked_node = layer_node[key], stacked_node[key]
        operands = {arg: stacked_node[attr][...] for arg, attr in w.operands.items()}
        layer_node[w.weight] = layer_node[w.weight].replace(
            value=StackedKernel(stacked_node[w.weight][...], index, w.matmul, operands))
    return layer_params

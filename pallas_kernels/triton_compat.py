"""Version shims for the Pallas Triton lowering (JAX 0.10 on CPU, 0.11 on the GPU image).

- Backend choice: since JAX 0.11 Mosaic GPU is the default Pallas GPU backend; a
  `pallas_call` gets the Triton lowering only when it passes the Triton `CompilerParams`
  (named `TritonCompilerParams` in older releases). We always pass it.
- `load`/`store` (masked loads with `other`) live in `jax.experimental.pallas.triton` in 0.10
  and 0.11 (older releases had `pl.load`/`pl.store`).
- `dot` is `jax.experimental.pallas.triton.dot` in 0.10 (older: `pl.dot`).
- Squeezed block dims: `pl.squeezed` (0.10+); `None` meant the same in older releases.
- Interpret mode: Pallas GPU kernels cannot run on the CPU backend except interpreted, so
  `interpret=None` means "interpret when the default backend is CPU".
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["compiler_params", "load", "store", "dot", "SQUEEZED", "resolve_interpret", "on_gpu"]


def _first_attr(name_list, *modules):
    for mod in modules:
        for name in name_list:
            fn = getattr(mod, name, None)
            if fn is not None:
                return fn
    raise ImportError(f"none of {name_list} found in {[m.__name__ for m in modules]}; "
                      f"this JAX ({jax.__version__}) moved a Pallas Triton API again")


_CompilerParams = _first_attr(("CompilerParams", "TritonCompilerParams"), plgpu, pl)
load = _first_attr(("load",), plgpu, pl)
store = _first_attr(("store",), plgpu, pl)
dot = _first_attr(("dot",), plgpu, pl)
SQUEEZED = getattr(pl, "squeezed", None)


def compiler_params(num_warps: int = 4, num_stages: int = 2):
    """Triton compiler params: selects the Triton lowering on GPU (see module doc)."""
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_interpret(interpret) -> bool:
    """None -> interpret unless the default backend is a GPU (CPU/TPU cannot run Triton)."""
    if interpret is None:
        return not on_gpu()
    return bool(interpret)

"""XLA compile options the project passes to every program it compiles itself.

On CPU, XLA's newer MLIR fusion emitters cost ~30% more compile time than the classic
emitters for this project's programs, with the same run time (measured 2026-12-02, 2-core box,
JAX 0.10.2: a tiny-llama prefill step 1.21 -> 0.89 CPU-s to compile; the main serve job's
33 steps + 7 samplers 32.5 -> 23.8 s; SmolLM2 decode b32 122 vs 117 ms, prefill 338 vs 343
ms: equal within noise). A start-up of dozens of bucketed steps is compile-bound, so CPU
programs are compiled with the classic emitters, and with LLVM's optimization level 1 instead
of 2: the main job's steps compile in 44 instead of 55 CPU-s, and a SmolLM2 decode step of 64
rows (its GEMMs and attention are C++ kernels) runs as fast (best of two runs each: 239 ms at
both levels; level 0: 399 ms; 2026-12-03, WORKSPACE_NOTES.md). The options are per program
(never the process-wide `XLA_FLAGS`, so a user's own JAX code is untouched); a jaxlib that
no longer knows an option gets none (checked once by compiling a one-op program), and
`FINESERVE_JAX_XLA_DEFAULTS=1` turns them off.

Programs the project jits outside the engine's step store (building the stacked layers,
quantizing them, calibration searches) get the same options through `jit_with_options`. On
CPU they give the same bits as XLA's defaults (tested on multiply-adds, transcendentals and
random sampling); level 0 would compile them faster but does not (no FMA contraction: the
last bit of `a * b + c`, `tanh`, a random normal differ), so it is not used.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp

log = logging.getLogger("fineserve_jax")

ENV_VAR = "FINESERVE_JAX_XLA_DEFAULTS"
_BY_PLATFORM: Dict[str, Dict[str, object]] = {
    "cpu": {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1},
}


@functools.lru_cache(maxsize=None)
def _accepted(platform: str) -> bool:
    opts = _BY_PLATFORM.get(platform, {})
    if not opts:
        return False
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(
            compiler_options=dict(opts))
        return True
    except Exception as e:  # noqa: BLE001 - an unknown option: compile with none
        log.info("XLA compile options %s not accepted on %s (%s): using XLA's defaults",
                 opts, platform, str(e).splitlines()[0][:120])
        return False


def compiler_options(platform: Optional[str] = None) -> Dict[str, object]:
    """The options for a program compiled for `platform` (default: JAX's default backend).
    A fresh dict: callers may pass it to `jax.jit(compiler_options=...)` or
    `Lowered.compile(compiler_options=...)`."""
    if os.environ.get(ENV_VAR, "") not in ("", "0"):
        return {}
    platform = platform or jax.default_backend()
    return dict(_BY_PLATFORM[platform]) if _accepted(platform) else {}


def jit_with_options(fun: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` compiled with `compiler_options`, chosen at the first
    call (not at import, which would compile the options probe). Called on tracers (inside
    another jit or `eval_shape`, where JAX takes no options), a plain nested jit."""
    nested = jax.jit(fun, **jit_kwargs)
    top = []

    @functools.wraps(fun)
    def call(*args, **kwargs):
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((args, kwargs))):
            return nested(*args, **kwargs)
        if not top:
            top.append(jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs))
        return top[0](*args, **kwargs)

    return call

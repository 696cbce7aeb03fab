"""One model's compiled steps: prefill per token-count bucket and decode per batch bucket,
compiled ahead of time, with the arena donated and rebound."""

from __future__ import annotations

import time
from typing import Dict, Tuple

import jax
import numpy as np
from flax import nnx

from fineserve_jax.engine.buckets import Buckets
from fineserve_jax.engine.paged_attention import PagedAttention
from fineserve_jax.engine.sampling import sample_tokens
from fineserve_jax.engine.step_inputs import StepInputs, empty_inputs
from fineserve_jax.formats import KVFormat
from fineserve_jax.loader import Model


def _step_fn(graphdef, fmt: KVFormat, kind: str, impl: str):
    def step(params, arena, x: StepInputs):
        module = nnx.merge(graphdef, params)
        backend = PagedAttention(arena, fmt, kind, x, impl)
        if kind == "decode":
            logits = module(x.tokens[:, None], x.positions[:, None], backend)[:, 0]
        else:
            logits = module(x.tokens[None], x.positions[None], backend,
                            logits_indices=x.logits_idx[None])[0]
        tokens = sample_tokens(logits, x.temperature, x.top_k, x.top_p, x.seeds, x.steps)
        return backend.arena, tokens

    return step


class ModelRunner:
    """Owns a model's parameters (split once from the NNX module) and compiled steps."""

    def __init__(self, name: str, model: Model, fmt: KVFormat, buckets: Buckets, impl: str):
        self.name, self.model, self.fmt, self.buckets, self.impl = name, model, fmt, buckets, impl
        graphdef, self.params = nnx.split(model.module)
        self._jit = {k: jax.jit(_step_fn(graphdef, fmt, k, impl), donate_argnums=(1,))
                     for k in ("prefill", "decode")}
        self._compiled: Dict[Tuple[str, int], object] = {}

    def shapes(self):
        b = self.buckets
        for n in b.prefill_sizes:
            yield "prefill", n, (n, b.prefill_seqs)
        for n in b.decode_sizes:
            yield "decode", n, (n, n)

    def compile_all(self, arena: jax.Array) -> None:
        """AOT-compile every (kind, bucket) step for this arena's shape."""
        arena_sds = jax.ShapeDtypeStruct(arena.shape, arena.dtype)
        for kind, size, (tokens, rows) in self.shapes():
            x = empty_inputs(tokens, rows, self.buckets.table_width)
            self._compiled[(kind, size)] = self._jit[kind].lower(self.params, arena_sds, x).compile()

    def inputs_for(self, kind: str, size: int) -> StepInputs:
        tokens, rows = (size, self.buckets.prefill_seqs) if kind == "prefill" else (size, size)
        return empty_inputs(tokens, rows, self.buckets.table_width)

    def run(self, kind: str, size: int, arena: jax.Array, x: StepInputs):
        """Dispatch one step (asynchronous). Returns (new arena, tokens [rows] on device)."""
        return self._compiled[(kind, size)](self.params, arena, x)

    def profile(self, arena: jax.Array, reps: int = 2):
        """Time every compiled step on padding inputs; returns (arena, {(kind, size): s})."""
        times = {}
        for kind, size, _ in self.shapes():
            x = self.inputs_for(kind, size)
            best = float("inf")
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                arena, tok = self.run(kind, size, arena, x)
                np.asarray(tok)
                best = min(best, time.perf_counter() - t0)
            times[(kind, size)] = best
        return arena, times

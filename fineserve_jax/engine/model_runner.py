"""One model's compiled steps: prefill per token-count bucket and decode per batch bucket,
compiled ahead of time, with the arena donated and rebound.

A step is a pure function `(params, arena, inputs) -> (new arena, logits [rows, vocab])`: the
arena's typed view goes through the decoder's layer scan as the cache carry (see
`PagedAttention`) and comes back out; nothing is held as backend state. Sampling is a second
compiled program per row count (`sample_tokens`), dispatched right after the step: it is the
same for every model of a vocabulary size, so it is compiled once per (rows, vocab) instead of
inside each of a model's bucketed steps (it was ~40% of a tiny model's step compile time)."""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Dict, Optional, Tuple

import jax
import numpy as np
from flax import nnx

from fineserve_jax.core.buckets import Buckets
from fineserve_jax.engine import step_cache
from fineserve_jax.engine.paged_attention import PagedAttention
from fineserve_jax.engine.sampling import sample_tokens
from fineserve_jax.engine.sharding import (DeviceGroup, KVSplit, kv_split, layouts_key,
                                           param_layouts, place_params, shardings_of)
from fineserve_jax.engine.step_inputs import StepInputs, empty_inputs
from fineserve_jax.formats import KVFormat
from fineserve_jax.kvslab import arena as arena_lib
from fineserve_jax.loader import Model
from models.layer_kernels import LayerKernels
from pallas_kernels import resolve_impl
from pallas_kernels.cpu.activation import swiglu_cpu
from pallas_kernels.cpu.matmul import quant_matmul_cpu, stacked_matmul_cpu


def layer_kernels(impl: str, group: Optional[DeviceGroup] = None) -> Optional[LayerKernels]:
    """The `LayerKernels` a step's decoder uses (`Transformer.__call__`): with the C++ CPU
    kernels (impl "cpu") the dense and quantized layers read their layer of the stacked
    weights in place and the MLP's activation is the vectorized kernel; else (and across
    devices: GSPMD cannot split a custom call) None, plain JAX."""
    if impl == "cpu" and (group is None or group.tp == 1):
        return LayerKernels(stacked_matmul=stacked_matmul_cpu, quant_matmul=quant_matmul_cpu,
                            swiglu=swiglu_cpu)
    return None


def _step_fn(graphdef, fmt: KVFormat, kind: str, impl: str, interpret=None,
             group: Optional[DeviceGroup] = None, split: Optional[KVSplit] = None):
    """The step `(params, arena, x) -> (arena, logits [rows, vocab] float32)`. With a group
    of tp > 1 devices, `fmt` is the per-device KV format and the arena is split by rows."""
    kernels = layer_kernels(impl, group)

    def step(params, arena, x: StepInputs):
        module = nnx.merge(graphdef, params)
        backend = PagedAttention(fmt, kind, x, impl, interpret, group, split)
        view = arena_lib.typed_view(arena, fmt)
        if kind == "decode":
            logits, view = module(x.tokens[:, None], x.positions[:, None], backend, view,
                                  kernels=kernels)
            logits = logits[:, 0]
        else:
            logits, view = module(x.tokens[None], x.positions[None], backend, view,
                                  logits_indices=x.logits_idx[None], kernels=kernels)
            logits = logits[0]
        return arena_lib.from_view(view, arena.shape), logits.astype(jax.numpy.float32)

    return step


def _sampling_args(x: StepInputs) -> tuple:
    """The per-row sampling arrays of a step's inputs (each [rows])."""
    return x.temperature, x.top_k, x.top_p, x.seeds, x.steps


class ModelRunner:
    """Owns a model's parameters (split once from the NNX module: the same arrays, no copy)
    and its compiled steps.

    `impl` is the user's attention impl ("auto" allowed); it is resolved once here by the
    kernel dispatcher's rules for this model's KV format, and `self.impl` is the result.
    `interpret` is the Pallas interpret mode (None: interpret unless running on a GPU;
    False also lets a CPU machine lower the steps for a GPU, as the lowering tests do).
    `group`: the device group to run on (None: the default device, nothing placed); its
    parameters are then placed in their tensor-parallel layouts (`engine.sharding`; the
    module is updated to hold the placed arrays, so there is one copy) and `fmt` must be
    the per-device KV format. `vocab_parallel`: split the embedding and LM head over the
    vocabulary (else replicate them).
    """

    def __init__(self, name: str, model: Model, fmt: KVFormat, buckets: Buckets, impl: str,
                 interpret: Optional[bool] = None, group: Optional[DeviceGroup] = None,
                 vocab_parallel: bool = True):
        self.name, self.model, self.fmt, self.buckets = name, model, fmt, buckets
        self.requested_impl = impl
        self.impl = resolve_impl(impl, fmt, interpret)
        self.group = group
        cfg = model.config
        self.split = kv_split(cfg.num_heads, cfg.num_kv_heads, group.tp if group else 1)
        if fmt.num_kv_heads != self.split.local_heads:
            raise ValueError(f"{name}: KV format {fmt.describe()} is not the per-device format "
                             f"of {self.split.local_heads} KV heads (tp {self.split.tp})")
        graphdef, params = nnx.split(model.module)
        self.layouts = param_layouts(params, cfg, self.split.tp, vocab_parallel=vocab_parallel)
        if group is not None:
            params = place_params(params, group, self.layouts)
            nnx.update(model.module, params)  # one copy: the module holds the placed arrays
        self.params = params
        # Models of the same structure share one jitted function per step kind, so JAX's
        # own cache serves a second engine of the same shapes (step_cache); on a device
        # group the key holds the group and the parameter layouts too.
        structure = hashlib.sha256(repr(graphdef).encode()).hexdigest()
        placement = None if group is None else (group.key, layouts_key(self.layouts))
        self._jit_key = {k: (structure, fmt, k, self.impl, interpret, placement)
                         for k in ("prefill", "decode")}
        self._jit = {k: step_cache.shared_step(
            self._jit_key[k],
            lambda k=k: jax.jit(_step_fn(graphdef, fmt, k, self.impl, interpret, group,
                                         self.split),
                                donate_argnums=(1,), **self._shardings()))
            for k in ("prefill", "decode")}
        self._sampler_key = ("sampler", None if group is None else group.key, cfg.vocab_size)
        self._sampler_jit = step_cache.shared_step(self._sampler_key, lambda: jax.jit(sample_tokens))
        # (kind, size) -> step executable; ("sample", rows) -> sampler executable
        self._compiled: Dict[Tuple[str, int], object] = {}
        self._identity: Dict[Tuple[str, int], str] = {}  # also the profile's key

    def _shardings(self) -> dict:
        """jit's in/out shardings on a device group (params as placed, the arena split by
        rows, step inputs and outputs replicated); none on the default device."""
        g = self.group
        if g is None:
            return {}
        return {"in_shardings": (shardings_of(self.params), g.arena_sharding, g.replicated),
                "out_shardings": (g.arena_sharding, g.replicated)}

    def _arena_spec(self, arena) -> jax.ShapeDtypeStruct:
        sharding = arena.sharding if self.group is not None else None
        return jax.ShapeDtypeStruct(arena.shape, arena.dtype, sharding=sharding)

    def shapes(self):
        """Every compiled (kind, bucket size); a step's arrays come from `inputs_for`."""
        for n in self.buckets.prefill_sizes:
            yield "prefill", n
        for n in self.buckets.decode_sizes:
            yield "decode", n

    def sampler_rows(self):
        """Row counts of the steps' logits (each needs a sampler executable)."""
        return sorted({self.inputs_for(kind, size).temperature.shape[0]
                       for kind, size in self.shapes()})

    def _step_args(self, kind: str, size: int, arena: jax.Array) -> tuple:
        return self.params, self._arena_spec(arena), self.inputs_for(kind, size)

    def _lower_step(self, kind: str, size: int, arena: jax.Array):
        return self._jit[kind].lower(*self._step_args(kind, size, arena))

    def jobs(self, arena: jax.Array) -> Dict[Tuple[str, int], step_cache.StepJob]:
        """Every (kind, bucket) step for this arena's shape and a sampler per row count, as
        build jobs (`step_cache.build_many`); {(kind, size) or ("sample", rows): StepJob}.
        A step's identity is also its profile's key."""
        jobs = {}
        for kind, size in self.shapes():
            args = self._step_args(kind, size, arena)
            identity = step_cache.executable_identity(self._jit_key[kind], args)
            self._identity[(kind, size)] = identity
            jobs[(kind, size)] = step_cache.StepJob(
                identity, functools.partial(self._jit[kind].lower, *args))
        for rows in self.sampler_rows():
            logits = jax.ShapeDtypeStruct((rows, self.model.config.vocab_size), jax.numpy.float32,
                                          sharding=None if self.group is None
                                          else self.group.replicated)
            args = (logits, *_sampling_args(self.inputs_for("decode", rows)))  # [rows] arrays
            jobs[("sample", rows)] = step_cache.StepJob(
                step_cache.executable_identity(self._sampler_key, args),
                functools.partial(self._sampler_jit.lower, *args))
        return jobs

    def set_compiled(self, compiled: Dict[Tuple[str, int], object]) -> None:
        """Install the executables of `jobs`' keys (built by the caller)."""
        self._compiled.update(compiled)

    def compile_all(self, arena: jax.Array) -> None:
        """Build every step and sampler for this arena's shape (from the executable store
        and the compilation caches where they hold it), several at once."""
        self.set_compiled(step_cache.build_many(self.jobs(arena))[0])

    def inputs_for(self, kind: str, size: int) -> StepInputs:
        tokens, rows = (size, self.buckets.prefill_seqs) if kind == "prefill" else (size, size)
        return empty_inputs(tokens, rows, self.buckets.table_width)

    def run(self, kind: str, size: int, arena: jax.Array, x: StepInputs):
        """Dispatch one step and its sampler (asynchronous). Returns (new arena, tokens
        [rows] on device)."""
        arena, logits = self._compiled[(kind, size)](self.params, arena, x)
        return arena, self._compiled[("sample", logits.shape[0])](logits, *_sampling_args(x))

    def compile_logits(self, kind: str, size: int, arena: jax.Array):
        """The step of `kind` and bucket `size` (logits out, no sampling), compiled on first
        use if the warm-up has not (tests, debugging, inspecting the partitioned program)."""
        key = (kind, size)
        if key not in self._compiled:
            self._compiled[key] = step_cache.compile_lowered(self._lower_step(kind, size, arena))
        return self._compiled[key]

    def step_logits(self, kind: str, size: int, arena: jax.Array, x: StepInputs):
        """One step without sampling: returns (new arena, logits [rows, vocab] float32)."""
        return self.compile_logits(kind, size, arena)(self.params, arena, x)

    def profile(self, arena: jax.Array, reps: int = 2):
        """Time every compiled step on padding inputs (best of reps + 1), except steps whose
        time is known from an earlier profile of the same program on this kind of device
        (with reps 0, from an earlier single run too); returns (arena, {(kind, size):
        seconds}, number of steps measured)."""
        times, measured = {}, 0
        for kind, size in self.shapes():
            fp = self._identity[(kind, size)]
            known = step_cache.known_time(fp, cold_ok=reps == 0)
            if known is not None:
                times[(kind, size)] = known
                continue
            x = self.inputs_for(kind, size)
            best = float("inf")
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                arena, tok = self.run(kind, size, arena, x)
                np.asarray(tok)
                best = min(best, time.perf_counter() - t0)
            times[(kind, size)] = best
            measured += 1
            # a single cold run is kept apart: it estimates for single-run starts only
            step_cache.record_time(fp, best, cold=reps == 0)
        return arena, times, measured

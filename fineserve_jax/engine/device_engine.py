"""The multi-model device engine: N models of any presets share one KV arena.

The engine is the device half of the one per-device loop (`fineserve_jax.core.loop`): it
loads and compiles the models, builds the arena and its allocator, profiles every compiled
bucket, and hands the loop a `DeviceExecutor` and a wall clock. Scheduling, submission
rules, request lifecycles and KV bookkeeping are the loop's and the scheduler's, the same
code the simulator runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import jax

from fineserve_jax.core.buckets import Buckets
from fineserve_jax.core.clock import WallClock
from fineserve_jax.core.loop import DeviceLoop, LoopConfig
from fineserve_jax.core.model_entry import ModelEntry, ModelLimits
from fineserve_jax.core.request import Request, RequestState
from fineserve_jax.engine.arena_sizing import auto_arena_bytes
from fineserve_jax.engine.block_ops import BlockOps
from fineserve_jax.engine.compile_counter import compile_count
from fineserve_jax.engine.device_executor import DeviceExecutor
from fineserve_jax.engine import step_cache
from fineserve_jax.engine.model_runner import ModelRunner
from fineserve_jax.engine.sharding import device_group, kv_split, local_kv_format
from fineserve_jax.kvslab import SlabAllocator, device_slab_bytes
from fineserve_jax.kvslab import arena as arena_lib
from fineserve_jax.loader import Model, load_model
from fineserve_jax.metrics import RequestRecord
from fineserve_jax.scheduler.local import LocalScheduler, SchedulerConfig
from fineserve_jax.scheduler.step_cost import BucketProfile


log = logging.getLogger("fineserve_jax")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model on the device: a name, a loaded `Model` or a preset name / HF directory,
    and the precision preset to quantize it to when it is not loaded yet."""

    name: str
    model: Union[str, Model]
    quant: str = "org"


@dataclasses.dataclass
class RequestOutput:
    request_id: int
    model: str
    prompt_token_ids: List[int]
    token_ids: List[int]
    text: Optional[str]
    status: str  # finished | dropped | failed
    finish_reason: Optional[str]
    error: Optional[str] = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


def _check_int(name: str, value, lo: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"Engine: {name} must be an int >= {lo}, got {value!r}")
    return value


class Engine:
    """Continuous batching of several models over one shared KV arena on one device.

    `devices`: the device group the engine runs on (None: the default device, nothing
    placed). A group of tp > 1 devices runs every model tensor-parallel over all of them
    (`engine.sharding`): parameters split Megatron-style, KV heads split so each device's part
    of the arena holds its heads of every block; the allocator, block ids and block tables
    stay one for the group. `arena_bytes` is then the arena of *each* device.
    """

    def __init__(self, models: Sequence[Union[ModelSpec, Tuple[str, Union[str, Model], str]]], *,
                 arena_bytes: Union[int, str] = "auto", tokens_per_block: int = 16,
                 max_model_len: int = 512, buckets: Optional[Buckets] = None,
                 scheduler: SchedulerConfig = SchedulerConfig(), attention_impl: str = "auto",
                 dtype: str = "float32", seed: int = 0, slab_target_bytes: int = 64 << 10,
                 compilation_cache_dir: Optional[str] = "auto", debug_poison: bool = False,
                 compaction_interval: int = 16, compaction_max_moves: int = 64,
                 profile_reps: int = 2, enable_prefix_caching: bool = True,
                 devices: Optional[Sequence] = None, vocab_parallel: bool = True):
        if arena_bytes != "auto":
            _check_int("arena_bytes", arena_bytes, 1)
        _check_int("tokens_per_block", tokens_per_block, 1)
        _check_int("max_model_len", max_model_len, 2)
        _check_int("slab_target_bytes", slab_target_bytes, 1)
        _check_int("seed", seed, 0)
        _check_int("compaction_interval", compaction_interval, 0)
        _check_int("compaction_max_moves", compaction_max_moves, 1)
        _check_int("profile_reps", profile_reps, 0)
        if buckets is not None and not isinstance(buckets, Buckets):
            raise ValueError(f"Engine: buckets must be a Buckets, got {type(buckets).__name__}")
        if not isinstance(scheduler, SchedulerConfig):
            raise ValueError(f"Engine: scheduler must be a SchedulerConfig, got "
                             f"{type(scheduler).__name__}")
        for name, v in (("debug_poison", debug_poison), ("enable_prefix_caching", enable_prefix_caching)):
            if not isinstance(v, bool):
                raise ValueError(f"Engine: {name} must be a bool, got {v!r}")
        if not isinstance(models, (list, tuple)):
            raise ValueError(f"Engine: models must be a list of ModelSpec, got {type(models).__name__}")
        specs = [m if isinstance(m, ModelSpec) else ModelSpec(*m) for m in models]
        if not specs:
            raise ValueError("Engine needs at least one model")
        names = [s.name for s in specs]
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"Engine: model names must be unique non-empty strings, got {names}")
        if compilation_cache_dir is not None and not isinstance(compilation_cache_dir, str):
            raise ValueError(f"Engine: compilation_cache_dir must be a folder, 'auto' or None, "
                             f"got {compilation_cache_dir!r}")
        if not isinstance(vocab_parallel, bool):
            raise ValueError(f"Engine: vocab_parallel must be a bool, got {vocab_parallel!r}")
        self.group = device_group(devices)
        self.tp = self.group.tp if self.group is not None else 1
        t_start = time.perf_counter()
        step_cache.enable_persistent_cache(compilation_cache_dir)
        self.tokens_per_block = tokens_per_block
        self.models: Dict[str, Model] = {}
        # Models are built on the group's first device (not the process's default one), then
        # placed in their layouts by the runners.
        where = (jax.default_device(self.group.devices[0]) if self.group is not None
                 else contextlib.nullcontext())
        with where:
            for s in specs:
                m = s.model if isinstance(s.model, Model) else load_model(
                    s.model, quant=s.quant, dtype=dtype, seed=seed)
                self.models[s.name] = m
        # Block formats as each device stores them (its KV heads; all of them when tp = 1):
        # the allocator, the slab size and the block bytes are per device.
        self.kv_splits = {n: kv_split(m.config.num_heads, m.config.num_kv_heads, self.tp)
                          for n, m in self.models.items()}
        self.formats = {n: local_kv_format(m.kv_format(tokens_per_block), self.kv_splits[n])
                        for n, m in self.models.items()}
        self.max_len = {n: min(max_model_len, m.config.max_context) for n, m in self.models.items()}
        # Block tables are as wide as the longest context actually served (a huge
        # max_model_len beyond every model's context costs nothing).
        width = -(-max(self.max_len.values()) // tokens_per_block)
        self.buckets = dataclasses.replace(buckets or Buckets(), table_width=width)

        # One arena; the slab size is a common multiple of every block size (no tails).
        slab = device_slab_bytes([f.block_bytes for f in self.formats.values()], slab_target_bytes)
        self.arena_sizing = "given"
        if arena_bytes == "auto":
            b = self.buckets
            arena_bytes, self.arena_sizing = auto_arena_bytes(
                [f.block_bytes for f in self.formats.values()],
                [-(-self.max_len[n] // tokens_per_block) for n in self.formats],
                b.max_decode + b.prefill_seqs, slab,
                self.group.devices[0] if self.group is not None else jax.devices()[0])
            log.info("KV arena %s", self.arena_sizing)
        num_slabs = arena_bytes // slab
        if num_slabs < 2:
            raise ValueError(f"Engine: an arena of {arena_bytes} B holds fewer than 2 slabs of "
                             f"{slab} B (slab 0 is reserved); give a larger arena_bytes")
        self.slab_bytes, self.num_slabs = slab, num_slabs
        allocator = SlabAllocator(num_slabs=num_slabs, slab_bytes=slab)
        arena = (arena_lib.make_arena(num_slabs, slab) if self.group is None else
                 arena_lib.make_arena(num_slabs, slab, device=self.group.arena_sharding,
                                      parts=self.tp))

        self.runners = {n: ModelRunner(n, m, self.formats[n], self.buckets, attention_impl,
                                       group=self.group, vocab_parallel=vocab_parallel)
                        for n, m in self.models.items()}
        c0 = compile_count()
        t0 = time.perf_counter()
        # Every model's steps are built together: loaded from the executable store, else
        # lowered and compiled (one compile thread per core). Jobs of one identity share an
        # executable: the samplers of a vocabulary size, the steps of models of one structure.
        jobs = {(n, key): job for n, r in self.runners.items()
                for key, job in r.jobs(arena).items()}
        compiled, loaded = step_cache.build_many(jobs)
        for n, r in self.runners.items():
            r.set_compiled({key: c for (m, key), c in compiled.items() if m == n})
        block_ops = BlockOps(arena, self.formats.values(), compaction_max_moves,
                             copy=compaction_interval > 0, poison=debug_poison, group=self.group)
        t_compiled = time.perf_counter()
        self.cost = BucketProfile()
        measured = 0
        for n, r in self.runners.items():
            arena, times, k = r.profile(arena, reps=profile_reps)
            measured += k
            for (kind, size), t in times.items():
                self.cost.set(n, kind, size, t)
        t_ready = time.perf_counter()
        self.warmup_s = t_ready - t0
        self.warmup_compiles = compile_count() - c0
        self._c_ready = compile_count()
        steps = sum(len(list(r.shapes())) for r in self.runners.values())
        self.startup = {
            "load_s": sum(m.load_s for m in self.models.values()),
            "quantize_s": sum(m.quantize_s for m in self.models.values()),
            "compile_s": t_compiled - t0, "profile_s": t_ready - t_compiled,
            "total_s": t_ready - t_start, "arena_bytes": num_slabs * slab,
            "arena_sizing": self.arena_sizing, "steps": steps, "executables_loaded": loaded,
            "backend_compiles": self.warmup_compiles,
            "steps_profiled": measured, "steps_profile_reused": steps - measured,
            "compilation_cache_dir": step_cache.enable_persistent_cache(None)}
        log.info("engine ready in %.1f s: load %.1f s, quantize %.1f s, compile %.1f s (%d steps, "
                 "%d executables loaded, %d backend compiles), profile %.1f s (%d measured, "
                 "%d known)", self.startup["total_s"], self.startup["load_s"],
                 self.startup["quantize_s"], self.startup["compile_s"], steps, loaded,
                 self.warmup_compiles, self.startup["profile_s"], measured, steps - measured)

        b = self.buckets
        limits = ModelLimits(b.max_prefill, b.prefill_seqs, b.max_decode)
        entries = {n: ModelEntry(n, m.preset.name, self.formats[n].block_bytes, tokens_per_block,
                                 limits, max_len=self.max_len[n], vocab_size=m.config.vocab_size,
                                 eos_token_id=m.config.eos_token_id)
                   for n, m in self.models.items()}
        self.debug_poison = debug_poison
        self.scheduler = LocalScheduler(entries, allocator, self.cost, scheduler,
                                        track_freed=debug_poison,
                                        prefix_caching=enable_prefix_caching)
        self.executor = DeviceExecutor(self.runners, arena, self.buckets, tokens_per_block,
                                       block_ops, debug_poison)
        self.loop = DeviceLoop(self.scheduler, self.executor, WallClock(),
                               tokenizers={n: m.tokenizer for n, m in self.models.items()},
                               config=LoopConfig(compaction_interval, compaction_max_moves))

    def reconfigure(self, scheduler: Optional[SchedulerConfig] = None,
                    enable_prefix_caching: Optional[bool] = None) -> None:
        """Change the scheduling policy or prefix caching between runs (nothing in flight);
        the compiled steps, the arena and the step-time profile are kept. Cached prefixes
        are dropped."""
        if self.scheduler.has_work:
            raise RuntimeError("Engine.reconfigure: requests are in flight")
        old = self.scheduler
        config = scheduler if scheduler is not None else old.config
        caching = (enable_prefix_caching if enable_prefix_caching is not None
                   else bool(old.caches))
        if not isinstance(config, SchedulerConfig) or not isinstance(caching, bool):
            raise ValueError("Engine.reconfigure: scheduler must be a SchedulerConfig and "
                             "enable_prefix_caching a bool")
        for c in old.caches:  # the idle cached blocks go back to the pool
            for block_bytes, ids in c.clear():
                self.executor.release_blocks(block_bytes, ids)
        self.scheduler = LocalScheduler(dict(old.models), old.allocator, self.cost, config,
                                        track_freed=self.debug_poison, prefix_caching=caching)
        self.scheduler.num_preemptions = old.num_preemptions
        self.loop.set_scheduler(self.scheduler)  # the request history (ids, records) stays

    # -- state ------------------------------------------------------------------------------
    @property
    def impl(self) -> str:
        """The attention implementation the compiled steps use (resolved, never "auto")."""
        impls = {r.impl for r in self.runners.values()}
        return impls.pop() if len(impls) == 1 else ",".join(sorted(impls))

    @property
    def allocator(self) -> SlabAllocator:
        return self.scheduler.allocator

    @property
    def arena(self):
        return self.executor.arena

    @property
    def kv_samples(self) -> List[Tuple[float, int, int]]:
        return self.loop.kv_samples

    @property
    def num_steps(self) -> int:
        return self.loop.stats.steps

    @property
    def compaction_stats(self) -> dict:
        return self.loop.stats.compaction()

    @property
    def steady_state_compiles(self) -> int:
        return compile_count() - self._c_ready

    def now(self) -> float:
        return self.loop.clock.now()

    # -- serving ----------------------------------------------------------------------------
    def submit(self, req: Request) -> RequestState:
        """Queue one request (arrival on the engine clock); see `DeviceLoop.submit`."""
        return self.loop.submit(req)

    def run(self, requests: Sequence[Request], realtime: bool = True, progress: bool = False,
            ) -> List[RequestOutput]:
        """Serve `requests` (arrival times in seconds after this call starts) to the end.

        realtime: requests arrive at their `arrival_s`; otherwise all are queued at once.
        Returns one output per request, in the order given; a bad request gets a `failed`
        output with the reason, and never disturbs the others.
        """
        if not isinstance(requests, (list, tuple)):
            raise ValueError(f"Engine.run: requests must be a list, got {type(requests).__name__}")
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), unit="req", desc="serving", mininterval=1.0)

        ended_before = len(self.loop.ended)

        def on_iteration(loop):
            n = len(loop.ended) - ended_before
            if n > bar.n:
                bar.update(n - bar.n)

        try:
            states = self.loop.run(requests, realtime=realtime,
                                   on_iteration=on_iteration if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        return [self.output(s) for s in states]

    def output(self, s: RequestState) -> RequestOutput:
        model = self.models.get(s.model)
        text = None
        if model is not None and model.tokenizer is not None:
            try:
                text = model.tokenizer.decode(s.output_token_ids)
            except Exception:  # noqa: BLE001 - tokens stay available; text is a convenience
                text = None
        return RequestOutput(
            request_id=s.request_id, model=s.model, prompt_token_ids=list(s.prompt_token_ids),
            token_ids=list(s.output_token_ids), text=text, status=s.status.value,
            finish_reason=s.finish_reason, error=s.error, num_cached_tokens=s.num_cached_tokens)

    def records(self) -> List[RequestRecord]:
        """Metric records of every request that ended."""
        return self.loop.records()

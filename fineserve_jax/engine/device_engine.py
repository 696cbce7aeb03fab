"""The multi-model device engine: N models of any presets share one KV arena.

One iteration: the local scheduler admits requests into KV memory and picks a (model,
batch); the batch builder fills the bucket's fixed-shape numpy arrays; the AOT-compiled
step runs with the arena donated; while it runs the host takes in new arrivals; then the
sampled tokens update the requests, and finished ones free their blocks.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from fineserve_jax.core.request import Request, RequestState, Status
from fineserve_jax.core.sampling_params import SamplingParams, stop_ids
from fineserve_jax.engine.block_ops import BlockOps
from fineserve_jax.engine.buckets import Buckets
from fineserve_jax.engine.compile_counter import compile_count
from fineserve_jax.engine.model_runner import ModelRunner
from fineserve_jax.engine.step_inputs import build_decode, build_prefill
from fineserve_jax.kvslab import (
    SlabAllocator,
    apply_compaction,
    choose_slab_bytes,
    plan_compaction,
)
from fineserve_jax.kvslab import arena as arena_lib
from fineserve_jax.loader import Model, load_model
from fineserve_jax.metrics import RequestRecord
from fineserve_jax.scheduler.execution import ModelLimits
from fineserve_jax.scheduler.local import LocalScheduler, ModelEntry, SchedulerConfig
from fineserve_jax.scheduler.step_cost import BucketProfile


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


def resolve_attention_impl(impl: str) -> str:
    if impl == "auto":
        return "reference" if jax.default_backend() == "cpu" else "pallas_triton"
    return impl


class Engine:
    """Continuous batching of several models over one shared KV arena on one device."""

    def __init__(self, models: Sequence[Union[ModelSpec, Tuple[str, Union[str, Model], str]]], *,
                 arena_bytes: int = 16 << 20, tokens_per_block: int = 16,
                 max_model_len: int = 512, buckets: Optional[Buckets] = None,
                 scheduler: SchedulerConfig = SchedulerConfig(), attention_impl: str = "auto",
                 dtype: str = "float32", seed: int = 0, slab_target_bytes: int = 64 << 10,
                 compilation_cache_dir: Optional[str] = None, debug_poison: bool = False,
                 compaction_interval: int = 16, compaction_max_moves: int = 64,
                 profile_reps: int = 2):
        if compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        specs = [m if isinstance(m, ModelSpec) else ModelSpec(*m) for m in models]
        if not specs:
            raise ValueError("Engine needs at least one model")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        self.impl = resolve_attention_impl(attention_impl)
        self.tokens_per_block = tokens_per_block
        width = -(-max_model_len // tokens_per_block)
        self.buckets = dataclasses.replace(buckets or Buckets(), table_width=width)
        self.models: Dict[str, Model] = {}
        for s in specs:
            m = s.model if isinstance(s.model, Model) else load_model(s.model, quant=s.quant,
                                                                        dtype=dtype, seed=seed)
            self.models[s.name] = m
        self.formats = {n: m.kv_format(tokens_per_block) for n, m in self.models.items()}
        self.max_len = {n: min(max_model_len, m.config.max_context) for n, m in self.models.items()}

        # One arena; the slab size is a common multiple of every block size (no tails).
        choice = choose_slab_bytes([f.block_bytes for f in self.formats.values()],
                                   target_slab_bytes=slab_target_bytes, max_lcm_factor=1e9)
        slab = choice.slab_bytes * max(1, slab_target_bytes // choice.slab_bytes)
        num_slabs = arena_bytes // slab
        if num_slabs < 2:
            raise ValueError(f"arena of {arena_bytes} B holds fewer than 2 slabs of {slab} B "
                             f"(slab 0 is reserved); give a larger arena_bytes")
        self.slab_bytes, self.num_slabs = slab, num_slabs
        self.allocator = SlabAllocator(num_slabs=num_slabs, slab_bytes=slab)
        self.arena = arena_lib.make_arena(num_slabs, slab)

        self.runners = {n: ModelRunner(n, m, self.formats[n], self.buckets, self.impl)
                        for n, m in self.models.items()}
        c0 = compile_count()
        t0 = time.perf_counter()
        for r in self.runners.values():
            r.compile_all(self.arena)
        self.cost = BucketProfile()
        for n, r in self.runners.items():
            self.arena, times = r.profile(self.arena, reps=profile_reps)
            for (kind, size), t in times.items():
                self.cost.set(n, kind, size, t)
        self.warmup_s = time.perf_counter() - t0

        b = self.buckets
        entries = {n: ModelEntry(n, self.models[n].preset.name, f.block_bytes, tokens_per_block,
                                 ModelLimits(b.max_prefill, b.prefill_seqs, b.max_decode))
                   for n, f in self.formats.items()}
        self.scheduler = LocalScheduler(entries, self.allocator, self.cost, scheduler)
        self.debug_poison = debug_poison
        if debug_poison:
            self.scheduler.freed_log = []
        self.compaction_interval = compaction_interval
        self.compaction_max_moves = compaction_max_moves
        self.block_ops = BlockOps(self.arena, self.formats.values(), compaction_max_moves,
                                  copy=compaction_interval > 0, poison=debug_poison)
        self.compaction_stats = {"runs": 0, "moved_blocks": 0, "moved_bytes": 0, "freed_slabs": 0}
        self.warmup_compiles = compile_count() - c0
        self._c_ready = compile_count()
        self._next_id = 0
        self._states: Dict[int, RequestState] = {}
        self._ended: List[RequestState] = []
        self.kv_samples: List[Tuple[float, int, int]] = []
        self.num_steps = 0
        self._clock0 = time.perf_counter()

    # -- clock ----------------------------------------------------------------------------
    def now(self) -> float:
        return time.perf_counter() - self._clock0

    def reset_clock(self) -> None:
        self._clock0 = time.perf_counter()

    @property
    def steady_state_compiles(self) -> int:
        return compile_count() - self._c_ready

    # -- submission -----------------------------------------------------------------------
    def _validate(self, req: Request) -> Tuple[Optional[List[int]], Optional[str]]:
        if req.model not in self.models:
            return None, f"unknown model {req.model!r}; serving: {', '.join(self.models)}"
        if not isinstance(req.sampling, SamplingParams):
            return None, f"sampling must be SamplingParams, got {type(req.sampling).__name__}"
        problem = req.sampling.problem()
        if problem:
            return None, f"invalid sampling parameters: {problem}"
        m = self.models[req.model]
        if isinstance(req.prompt, str):
            ids = m.tokenizer.encode(req.prompt)
        else:
            try:
                ids = [int(t) for t in req.prompt]
            except (TypeError, ValueError):
                return None, "prompt must be a string or a list of token ids"
        if not ids:
            return None, "empty prompt"
        bad = [t for t in ids if not 0 <= t < m.config.vocab_size]
        if bad:
            return None, f"token ids out of range [0, {m.config.vocab_size}): {bad[:4]}"
        limit = self.max_len[req.model]
        if len(ids) >= limit:
            return None, (f"prompt of {len(ids)} tokens exceeds the model's maximum of "
                          f"{limit - 1} prompt tokens (context {limit})")
        fmt = self.formats[req.model]
        # A request must be able to finish alone, else preemption would cycle forever.
        longest = min(len(ids) + req.sampling.max_tokens, limit)
        need = fmt.blocks_for_tokens(longest)
        cap = (self.num_slabs - 1) * (self.slab_bytes // fmt.block_bytes)
        if need > cap:
            return None, (f"prompt + max_tokens ({longest} tokens) needs {need} KV blocks but "
                          f"the arena holds only {cap} blocks of this model's format")
        return ids, None

    def submit(self, req: Request) -> RequestState:
        """Queue a request (arrival time = `req.arrival_s` on the engine clock). A bad
        request is failed at once with a reason; it never reaches the scheduler."""
        rid = req.request_id if req.request_id is not None else self._next_id
        self._next_id = max(self._next_id, rid + 1)
        ids, error = self._validate(req)
        model = self.models.get(req.model)
        seq = RequestState(
            request_id=rid, model=req.model, prompt_token_ids=ids or [],
            sampling=req.sampling if isinstance(req.sampling, SamplingParams) else SamplingParams(),
            arrival_s=req.arrival_s, slo_ttft_s=req.slo_ttft_s,
            stop_ids=frozenset(stop_ids(req.sampling, model.config.eos_token_id)) if model and not error else frozenset(),
            max_len=self.max_len.get(req.model, 0))
        self._states[rid] = seq
        if error:
            seq.end(Status.FAILED, req.arrival_s, error)
            self._ended.append(seq)
        else:
            self.scheduler.add(seq)
        return seq

    # -- one iteration ----------------------------------------------------------------------
    def step(self, while_device_runs: Optional[Callable[[], None]] = None) -> bool:
        """Run one scheduler iteration; returns False when there was nothing to run.

        `while_device_runs` is host work done between dispatching the step and reading its
        tokens back (the engine's own loop takes in new arrivals there).
        """
        if (self.compaction_interval > 0 and self.scheduler.waiting
                and self.num_steps % self.compaction_interval == 0):
            self.compact()  # requests wait for memory: give sparse slabs back to the pool
        now = self.now()
        out = self.scheduler.schedule(now)
        for s in out.dropped:
            s.end(Status.DROPPED, now, "slo")
            self._ended.append(s)
        if self.debug_poison:
            # Blocks freed by preemption/dropping may already be reallocated within this
            # schedule() call: poison them before the step writes its new KV.
            self._poison_freed()
        plan = out.step
        if plan is None:
            return False
        runner = self.runners[plan.model]
        b, t = self.buckets, self.tokens_per_block
        if plan.kind == "prefill":
            size = b.prefill_bucket(plan.num_tokens)
            x = build_prefill(plan.seqs, plan.chunks, size, b.prefill_seqs, b.table_width, t)
        else:
            size = b.decode_bucket(len(plan.seqs))
            x = build_decode(plan.seqs, size, b.table_width, t)
        t0 = time.perf_counter()
        self.arena, tokens = runner.run(plan.kind, size, self.arena, x)
        tokens.copy_to_host_async()
        # Overlap: while the device runs, the host samples KV use and takes in arrivals.
        self.kv_samples.append((now, self.allocator.used_bytes, self._reserved_bytes()))
        # If the host work outlasted the step, the elapsed time measures the host, not the
        # device: then it is not fed to the cost model.
        device_outlasted_host = True
        if while_device_runs is not None:
            while_device_runs()
            device_outlasted_host = not tokens.is_ready()
        host_tokens = np.asarray(tokens)
        if device_outlasted_host:
            self.cost.observe(plan.model, plan.kind, size, time.perf_counter() - t0)
        done = self.scheduler.on_step_done(plan, host_tokens[: len(plan.seqs)].tolist(), self.now())
        self._ended.extend(done)
        if self.debug_poison:
            self._poison_freed()
        self.num_steps += 1
        return True

    def _poison_freed(self) -> None:
        log, self.scheduler.freed_log = self.scheduler.freed_log, []
        for model, ids in log:
            self.arena = self.block_ops.poison(self.arena, self.formats[model].block_bytes, ids)

    def compact(self) -> int:
        """Move live blocks out of the sparsest slabs so they return to the common pool
        (device copy, then allocator bookkeeping, then block-table rewrite). Returns the
        number of slabs freed."""
        plan = plan_compaction(self.allocator, max_moves=self.compaction_max_moves)
        if not plan.moves:
            return 0
        for b in plan.block_sizes:
            moves = [m for m in plan.moves if m.block_bytes == b]
            self.arena = self.block_ops.copy(self.arena, b, [m.src for m in moves],
                                             [m.dst for m in moves])
        freed = apply_compaction(self.allocator, plan)
        self._rewrite_block_tables(plan)
        if self.debug_poison:  # a stale table entry would now read NaN
            for b in plan.block_sizes:
                self.arena = self.block_ops.poison(
                    self.arena, b, [m.src for m in plan.moves if m.block_bytes == b])
        st = self.compaction_stats
        st["runs"] += 1
        st["moved_blocks"] += plan.num_moves
        st["moved_bytes"] += plan.moved_bytes
        st["freed_slabs"] += len(freed)
        return len(freed)

    def _rewrite_block_tables(self, plan) -> None:
        for b in plan.block_sizes:
            id_map = plan.id_map(b)
            for seqs in self.scheduler.running.values():
                for s in seqs:
                    if self.formats[s.model].block_bytes == b:
                        s.block_ids = [id_map.get(i, i) for i in s.block_ids]

    def _reserved_bytes(self) -> int:
        return (self.num_slabs - 1 - self.allocator.free_slabs) * self.slab_bytes

    # -- driving a workload -----------------------------------------------------------------
    def run(self, requests: Sequence[Request], realtime: bool = True, progress: bool = False,
            ) -> List[RequestOutput]:
        """Serve `requests` (arrival times on the engine clock, starting now) to the end.

        realtime: requests arrive at their `arrival_s`; otherwise all are queued at once.
        Returns one output per request, in the order given.
        """
        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
        states: List[Optional[RequestState]] = [None] * len(requests)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), unit="req", desc="serving", mininterval=1.0)
        self.reset_clock()
        nxt = 0
        ended_before = len(self._ended)

        def take_arrivals():
            nonlocal nxt
            now = self.now()
            while nxt < len(order) and (not realtime or requests[order[nxt]].arrival_s <= now):
                i = order[nxt]
                req = requests[i] if realtime else dataclasses.replace(requests[i], arrival_s=now)
                states[i] = self.submit(req)
                nxt += 1

        while True:
            take_arrivals()
            ran = self.step(while_device_runs=take_arrivals)
            if bar is not None:
                bar.update(len(self._ended) - ended_before - bar.n)
            if not ran:
                if nxt == len(order) and not self.scheduler.has_work:
                    break
                if not any(self.scheduler.running.values()) and self.scheduler.waiting and \
                        self.allocator.used_bytes == 0 and nxt == len(order):
                    # Validation guarantees a lone request fits; never spin if that breaks.
                    raise RuntimeError(f"scheduler stalled with {len(self.scheduler.waiting)} "
                                       f"waiting requests and an empty arena")
                if nxt < len(order):
                    wait = requests[order[nxt]].arrival_s - self.now()
                    if wait > 0 and not self.scheduler.has_work:
                        time.sleep(min(wait, 0.05))
        if bar is not None:
            bar.close()
        return [self.output(s) for s in states]

    def output(self, s: RequestState) -> RequestOutput:
        tok = self.models[s.model].tokenizer if s.model in self.models else None
        return RequestOutput(
            request_id=s.request_id, model=s.model, prompt_token_ids=list(s.prompt_token_ids),
            token_ids=list(s.output_token_ids),
            text=tok.decode(s.output_token_ids) if tok is not None else None,
            status=s.status.value, finish_reason=s.finish_reason, error=s.error)

    def records(self) -> List[RequestRecord]:
        """Metric records of every request that ended."""
        out = []
        for s in self._states.values():
            if not s.status.is_final:
                continue
            preset = self.models[s.model].preset.name if s.model in self.models else None
            out.append(s.to_record(preset))
        return out

"""The per-device local scheduler: admission into KV memory, then execution (which model
steps with which requests), over slab allocators. Pure Python: the one device loop
(`fineserve_jax.core.loop`) drives it for the engine and the simulator alike.

The scheduler owns every block id: it allocates them onto `RequestState.block_ids`, frees
them, hands the freed ones out (`drain_freed`), relocates them for compaction
(`plan_compaction` / `apply_compaction`), and accounts for KV memory (`kv_usage`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

from fineserve_jax.core.model_entry import ModelEntry
from fineserve_jax.core.request import RequestState, Status
from fineserve_jax.core.step_plan import StepPlan, StepResult
from fineserve_jax.kvslab import (CompactionPlan, OutOfKVMemory, SlabAllocator, apply_compaction,
                                  plan_compaction, rewrite_block_tables)
from fineserve_jax.kvslab.prefix_cache import PrefixCache
from fineserve_jax.scheduler.admission import ADMISSION_POLICIES, admission_key, order_waiting
from fineserve_jax.scheduler.execution import EXECUTION_POLICIES, pack_prefill, pick_decode_model


@dataclasses.dataclass
class SchedulerOutput:
    step: Optional[StepPlan]
    dropped: List[RequestState]


@dataclasses.dataclass
class SchedulerConfig:
    admission: str = "deadline"
    execution: str = "saab"
    drop: bool = True  # saab: drop requests whose TTFT SLO cannot be met (else deprioritise)
    aging_s: float = 5.0
    max_decode_gap_s: float = 0.5  # saab: run a waiting decode batch at least this often
    watermark: float = 0.0  # fraction of a pool's bytes admission leaves free (vLLM's idea)

    def __post_init__(self):
        if self.execution not in EXECUTION_POLICIES:
            raise ValueError(f"unknown execution policy {self.execution!r}; valid: "
                             f"{', '.join(EXECUTION_POLICIES)}")
        if self.admission not in ADMISSION_POLICIES:
            raise ValueError(f"unknown admission policy {self.admission!r}; valid: "
                             f"{', '.join(ADMISSION_POLICIES)}")
        for name in ("aging_s", "max_decode_gap_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"SchedulerConfig.{name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.watermark, (int, float)) or not 0 <= self.watermark < 1:
            raise ValueError(f"SchedulerConfig.watermark must be in [0, 1), got {self.watermark!r}")
        if not isinstance(self.drop, bool):
            raise ValueError(f"SchedulerConfig.drop must be a bool, got {self.drop!r}")


class LocalScheduler:
    """Admission and execution over KV *pools*.

    `allocator` is the device's one shared KV arena (FineServe's KV slab). `allocators`
    (model name -> allocator) gives each model a pool instead; several models may share one
    pool object (e.g. one pool per layer count). Within a pool admission is in strict
    priority order: a request that does not fit blocks the rest of its pool (aging
    guarantees it gets in eventually), while other pools go on. A decode that runs out of
    memory preempts the latest-admitted running sequence of the same pool (recompute).
    """

    def __init__(self, models: Dict[str, ModelEntry], allocator: Optional[SlabAllocator], cost,
                 config: SchedulerConfig = SchedulerConfig(),
                 allocators: Optional[Dict[str, SlabAllocator]] = None,
                 track_freed: bool = False, prefix_caching: bool = False):
        self.models = models
        if allocators is not None:
            missing = set(models) - set(allocators)
            if missing:
                raise ValueError(f"no KV pool for model(s) {sorted(missing)}")
            self._alloc_of = {m: allocators[m] for m in models}
        elif allocator is None:
            raise ValueError("give a shared allocator or per-model allocators")
        else:
            self._alloc_of = {m: allocator for m in models}
        pools: List[SlabAllocator] = []
        for a in self._alloc_of.values():
            if all(a is not p for p in pools):
                pools.append(a)
        self.pools = pools
        self.shared = len(pools) == 1
        # Prefix caching: one cache per pool (block ids are per pool); None when off.
        caches = {id(p): PrefixCache(p) for p in pools} if prefix_caching else {}
        self.caches = list(caches.values())
        self._cache_of = {m: caches[id(a)] for m, a in self._alloc_of.items()} if caches else None
        self.cost = cost
        self.config = config
        self._key = admission_key(config.admission, {m: e.preset for m, e in models.items()},
                                  config.aging_s)
        self.waiting: List[RequestState] = []
        self.running: Dict[str, List[RequestState]] = {m: [] for m in models}
        self._admit_order: List[RequestState] = []  # running, in admission order (victims last)
        self._last_step_s: Dict[str, float] = {}
        self._rr = 0
        self.num_preemptions = 0
        self._freed: Optional[List[Tuple[int, List[int]]]] = [] if track_freed else None

    @property
    def allocator(self) -> SlabAllocator:
        """The shared arena (one pool only)."""
        if not self.shared:
            raise AttributeError("this scheduler has several KV pools; see .pools")
        return self.pools[0]

    # -- block ownership ------------------------------------------------------------------
    def pool(self, model: str) -> SlabAllocator:
        """The allocator `model`'s KV blocks come from."""
        return self._alloc_of[model]

    def capacity_blocks(self, model: str) -> int:
        """Blocks one sequence of `model` could ever hold: its whole pool but the null slab."""
        a = self._alloc_of[model]
        return (a.num_slabs - 1) * a.blocks_per_slab(self.models[model].block_bytes)

    def _allocate(self, model: str, n: int) -> List[int]:
        """n blocks for `model`; with prefix caching, idle cached blocks are evicted (whole
        slabs first) until the allocation fits or nothing idle is left."""
        alloc, b = self._alloc_of[model], self.models[model].block_bytes
        while True:
            try:
                return alloc.allocate(block_bytes=b, num_blocks=n)
            except OutOfKVMemory:
                freed = self._cache_of[model].evict(b, n) if self._cache_of else None
                if not freed:
                    raise
                if self._freed is not None:
                    self._freed.extend(freed)

    def prefix_cache_stats(self) -> Optional[dict]:
        """Prefix-cache counters summed over the pools (None when caching is off)."""
        if not self.caches:
            return None
        out = {k: sum(getattr(c.stats, k) for c in self.caches)
               for k in ("queries", "hit_blocks", "hit_tokens", "registered_blocks",
                         "evicted_blocks")}
        out["idle_bytes"] = sum(c.idle_bytes for c in self.caches)
        out["cached_blocks"] = sum(c.num_cached for c in self.caches)
        return out

    def kv_usage(self) -> Tuple[int, int]:
        """(bytes in blocks that requests hold, bytes reserved for KV: formatted slabs of
        every pool). Idle cached blocks are in neither: they are reclaimable on demand
        (`prefix_cache_stats()["idle_bytes"]`)."""
        used = reserved = 0
        for a in self.pools:
            used += a.used_bytes
            reserved += (a.num_slabs - 1 - a.free_slabs) * a.slab_bytes
        for c in self.caches:
            idle = c.idle_bytes
            used -= idle
            reserved -= idle
        return used, reserved

    def drain_freed(self) -> List[Tuple[int, List[int]]]:
        """(block bytes, ids) freed since the last call (only with `track_freed`)."""
        out, self._freed = self._freed, ([] if self._freed is not None else None)
        return out or []

    def plan_compaction(self, max_moves: int) -> List[Tuple[SlabAllocator, CompactionPlan]]:
        """Moves that would empty the sparsest slabs of each pool (nothing changes yet)."""
        return [(a, p) for a in self.pools
                for p in [plan_compaction(a, max_moves=max_moves)] if p.moves]

    def apply_compaction(self, plans: Sequence[Tuple[SlabAllocator, CompactionPlan]]) -> int:
        """After the device copied the blocks: the allocators take the moves and every block
        table that maps a moved block is rewritten. Returns the slabs freed."""
        freed = 0
        caches = {id(c.alloc): c for c in self.caches}
        for alloc, plan in plans:
            freed += len(apply_compaction(alloc, plan))
            for b in plan.block_sizes:
                id_map = plan.id_map(b)
                if id(alloc) in caches:  # cached blocks (idle or shared) move too
                    caches[id(alloc)].relocate(b, id_map)
                owners = {id(s): s for seqs in self.running.values() for s in seqs
                          if self._alloc_of[s.model] is alloc
                          and self.models[s.model].block_bytes == b}
                tables = rewrite_block_tables({k: s.block_ids for k, s in owners.items()}, id_map)
                for k, s in owners.items():
                    s.block_ids = tables[k]
        return freed

    # -- bookkeeping ------------------------------------------------------------------
    def reset_time(self) -> None:
        """The clock starts again at 0 (a new run): forget when each model last stepped.
        Only valid with nothing in flight."""
        if self.has_work:
            raise RuntimeError("reset_time with requests in flight")
        self._last_step_s.clear()
        self._rr = 0

    def add(self, seq: RequestState) -> None:
        if seq.model not in self.models:
            raise KeyError(seq.model)
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(self.running.values())

    @property
    def num_running(self) -> int:
        return len(self._admit_order)

    def _grow(self, seq: RequestState, tokens: int) -> None:
        e = self.models[seq.model]  # runs for every decode row: keep it lean
        n = -(-tokens // e.tokens_per_block) - len(seq.block_ids)
        if n > 0:
            if self._cache_of is None:
                seq.block_ids += self._alloc_of[seq.model].allocate(block_bytes=e.block_bytes,
                                                                    num_blocks=n)
            else:
                seq.block_ids += self._allocate(seq.model, n)

    def release(self, seq: RequestState) -> None:
        """Let go of a sequence's blocks and forget it (it ended or was preempted): private
        blocks are freed; cached ones lose a reference and stay cached."""
        if seq.block_ids:
            b = self.models[seq.model].block_bytes
            ids = seq.block_ids
            cache = self._cache_of[seq.model] if self._cache_of is not None else None
            if cache is not None:
                ids = [i for i in ids if not cache.release(b, i)]
                seq.cache_chain = []
            self._alloc_of[seq.model].free(block_bytes=b, block_ids=ids)
            if cache is not None:
                cache.freed(b, ids)
            if self._freed is not None and ids:
                self._freed.append((b, ids))
            seq.block_ids = []
        if seq.status is Status.RUNNING and seq in self.running.get(seq.model, ()):
            self.running[seq.model].remove(seq)
            self._admit_order.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: RequestState) -> None:
        self.release(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0  # recompute: prompt + output so far are prefilled again
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)

    def preempt_all(self) -> List[RequestState]:
        """Every running sequence back to waiting (the device lost their KV, and with it
        every cached block)."""
        for c in self.caches:
            freed = c.clear()
            if self._freed is not None:
                self._freed.extend(freed)
        victims = list(self._admit_order)
        for s in victims:
            self._preempt(s)
        return victims

    # -- stage 1: admission ---------------------------------------------------------------
    def _fits_watermark(self, seq: RequestState) -> bool:
        a, e = self._alloc_of[seq.model], self.models[seq.model]
        need = e.blocks_for_tokens(seq.num_tokens) - len(seq.block_ids)
        keep = -(-int(self.config.watermark * a.total_bytes) // e.block_bytes)
        return a.free_blocks(e.block_bytes) - need >= keep

    def _admit(self, now: float) -> None:
        # Strict priority order within a pool: a request that does not fit blocks the rest
        # of its pool (aging gets it in eventually). Letting later requests fill free blocks
        # of already formatted slabs was measured (experiments.fragmentation, notes): more
        # KV in use but 3-6x the preemptions and longer queueing with compaction on.
        blocked = []
        watermark = self.config.watermark > 0
        for seq in order_waiting(self.waiting, self._key, now):
            pool = self._alloc_of[seq.model]
            if blocked and any(pool is p for p in blocked):
                continue
            fits = not watermark or self._fits_watermark(seq)
            if fits:
                try:
                    if self._cache_of is None:
                        self._grow(seq, seq.num_tokens)
                    else:
                        self._admit_with_cache(seq)
                except OutOfKVMemory:
                    fits = False
            if not fits:
                blocked.append(pool)
                if len(blocked) == len(self.pools):
                    break
                continue
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            seq.admitted_s = now
            if seq.first_admitted_s is None:
                seq.first_admitted_s = now
            self.running[seq.model].append(seq)
            self._admit_order.append(seq)

    def _full_blocks(self, seq: RequestState, limit: int, start: int = 0) -> List[Tuple[int, ...]]:
        t = self.models[seq.model].tokens_per_block
        return [tuple(seq.token_slice(i * t, (i + 1) * t)) for i in range(start, limit)]

    def _cached_prefix(self, seq: RequestState):
        """The cached blocks a sequence's tokens start with; at least its last token is
        always computed (its logits are needed), so a whole-prompt hit stops a block short."""
        t = self.models[seq.model].tokens_per_block
        return self._cache_of[seq.model].match(seq.model, self._full_blocks(seq, (seq.num_tokens - 1) // t))

    def _admit_with_cache(self, seq: RequestState) -> None:
        """Map the cached prefix read-only, allocate the rest (raises OutOfKVMemory with
        nothing held)."""
        cache, t = self._cache_of[seq.model], self.models[seq.model].tokens_per_block
        hits = self._cached_prefix(seq)
        for h in hits:  # held first, so that evicting to make room cannot take them
            cache.acquire(h)
        need = -(-seq.num_tokens // t) - len(hits)
        try:
            new = self._allocate(seq.model, need) if need > 0 else []
        except OutOfKVMemory:
            for h in hits:
                cache.release(h.block_bytes, h.block_id)
            raise
        seq.block_ids = [h.block_id for h in hits] + new
        seq.cache_chain = [h.id for h in hits]
        seq.num_computed = len(hits) * t
        cache.stats.queries += 1
        cache.stats.hit_blocks += len(hits)
        cache.stats.hit_tokens += seq.num_computed
        if seq.first_admitted_s is None:
            seq.num_cached_tokens = min(seq.num_computed, len(seq.prompt_token_ids))

    def _rebind_to_cache(self, seq: RequestState) -> None:
        """Before a prefill: blocks that another request computed and cached since this one
        was admitted replace its own unwritten blocks (requests admitted together with the
        same prefix compute it once, not each)."""
        cache, e = self._cache_of[seq.model], self.models[seq.model]
        t = e.tokens_per_block
        done = len(seq.cache_chain)
        if seq.num_computed != done * t:
            return  # mid-block, or computed blocks not yet in the chain
        limit = (seq.num_tokens - 1) // t
        if done >= limit:
            return
        hits = cache.match_from(seq.model, seq.cache_chain[-1] if done else cache.ROOT,
                                self._full_blocks(seq, limit, start=done))
        if not hits:
            return
        freed = []
        for k, h in enumerate(hits):
            cache.acquire(h)
            freed.append(seq.block_ids[done + k])  # private and never written: free it
            seq.block_ids[done + k] = h.block_id
            seq.cache_chain.append(h.id)
        self._alloc_of[seq.model].free(block_bytes=e.block_bytes, block_ids=freed)
        cache.freed(e.block_bytes, freed)
        if self._freed is not None:
            self._freed.append((e.block_bytes, freed))
        n = len(hits) * t
        seq.num_computed += n
        cache.stats.hit_blocks += len(hits)
        cache.stats.hit_tokens += n
        if not seq.preemptions:
            seq.num_cached_tokens = min(seq.num_cached_tokens + n, len(seq.prompt_token_ids))

    def _one_writer_per_block(self, pending: List[RequestState]) -> List[RequestState]:
        """Requests (in priority order) whose next block has the same content and prefix as
        the next block of a request before them wait a step: that one computes it, then
        they map it from the cache instead of computing it again."""
        t = self.models[pending[0].model].tokens_per_block
        in_flight, out = set(), []
        for s in pending:
            c = s.num_computed
            if c % t == 0 and c + t < s.num_tokens and len(s.cache_chain) * t == c:
                key = (s.cache_chain[-1] if s.cache_chain else PrefixCache.ROOT,
                       tuple(s.token_slice(c, c + t)))
                if key in in_flight:
                    continue
                in_flight.add(key)
            out.append(s)
        return out

    def _register_full_blocks(self, seq: RequestState) -> None:
        """Blocks that are full and computed join the cache (never earlier: a block being
        written is never shared)."""
        t = self.models[seq.model].tokens_per_block
        full = seq.num_computed // t
        chain = seq.cache_chain
        if full <= len(chain):
            return
        cache, b = self._cache_of[seq.model], self.models[seq.model].block_bytes
        for i in range(len(chain), full):
            parent = chain[i - 1] if i else cache.ROOT
            chain.append(cache.register(seq.model, parent, tuple(seq.token_slice(i * t, (i + 1) * t)),
                                        b, seq.block_ids[i]))

    def uncached_tokens(self, seq: RequestState) -> int:
        """Tokens a waiting sequence would prefill now (its cached prefix excluded)."""
        if self._cache_of is None:
            return seq.num_tokens
        return seq.num_tokens - len(self._cached_prefix(seq)) * self.models[seq.model].tokens_per_block

    # -- stage 2: execution ---------------------------------------------------------------
    def _drop_hopeless(self, now: float, dropped: List[RequestState]) -> None:
        for m, seqs in self.running.items():
            for s in list(seqs):
                if s.first_token_s is not None or s.slo_ttft_s is None or s.low_priority:
                    continue
                if now + self.cost.prefill_time(m, s.num_pending_prefill, 1) > s.deadline_s:
                    if self.config.drop:
                        self.release(s)
                        dropped.append(s)
                    else:
                        s.low_priority = True
        for s in list(self.waiting):  # never admitted and already past hope
            if s.slo_ttft_s is not None and s.first_token_s is None and not s.low_priority:
                # (The whole prompt first: only a request that looks hopeless is worth a
                # cache lookup, which can only shorten its prefill.)
                if (now + self.cost.prefill_time(s.model, s.num_tokens, 1) > s.deadline_s and
                        now + self.cost.prefill_time(s.model, self.uncached_tokens(s), 1) > s.deadline_s):
                    if self.config.drop:
                        self.waiting.remove(s)
                        dropped.append(s)
                    else:
                        s.low_priority = True

    def _prefill_plan(self, model: str, now: float, slo_aware: bool) -> Optional[StepPlan]:
        if self._cache_of is not None:
            for s in self.running[model]:
                if s.num_pending_prefill > 0:
                    self._rebind_to_cache(s)
        pending = [s for s in self.running[model] if s.num_pending_prefill > 0]
        if not pending:
            return None
        if slo_aware:
            pending.sort(key=lambda s: (s.low_priority, s.deadline_s, s.arrival_s))
        else:
            pending.sort(key=lambda s: s.arrival_s)
        if self._cache_of is not None:
            pending = self._one_writer_per_block(pending)
        seqs, chunks = pack_prefill(pending, self.models[model].limits, now, self.cost, model,
                                    slo_aware)
        return StepPlan(model, "prefill", seqs, chunks) if seqs else None

    def _decodable(self) -> Dict[str, List[RequestState]]:
        return {m: [s for s in seqs if s.in_decode] for m, seqs in self.running.items()}

    def _decode_plan(self, model: str, decodable) -> Optional[StepPlan]:
        batch = sorted(decodable[model], key=lambda s: s.admitted_s or 0.0)
        batch = batch[: self.models[model].limits.max_decode_seqs]
        out = []
        for s in batch:
            if s.status is not Status.RUNNING:
                continue  # preempted below as a victim of an earlier row
            while True:
                try:
                    self._grow(s, s.num_tokens)
                    out.append(s)
                    break
                except OutOfKVMemory:
                    victim = self._victim(s.model)
                    self._preempt(victim)
                    if victim is s:
                        break
                    if victim in out:
                        out.remove(victim)
        return StepPlan(model, "decode", out, [1] * len(out)) if out else None

    def _victim(self, model: str) -> RequestState:
        """The latest-admitted running sequence whose blocks would relieve `model`'s pool."""
        if self.shared:
            return self._admit_order[-1]
        pool = self._alloc_of[model]
        return next(s for s in reversed(self._admit_order) if self._alloc_of[s.model] is pool)

    def schedule(self, now: float) -> SchedulerOutput:
        dropped: List[RequestState] = []
        policy = self.config.execution
        if policy == "saab":
            self._drop_hopeless(now, dropped)
        self._admit(now)
        decodable = self._decodable()
        plan = None
        if policy == "saab":
            plan = self._saab(now, decodable)
        elif policy == "round_robin":
            names = list(self.models)
            for i in range(len(names)):
                m = names[(self._rr + i) % len(names)]
                plan = self._prefill_plan(m, now, False) or (
                    self._decode_plan(m, decodable) if decodable[m] else None)
                if plan:
                    self._rr = (self._rr + i + 1) % len(names)
                    break
        else:  # fcfs: the model of the oldest running request goes first
            for s in sorted((s for v in self.running.values() for s in v), key=lambda s: s.arrival_s):
                plan = self._prefill_plan(s.model, now, False) or (
                    self._decode_plan(s.model, decodable) if decodable[s.model] else None)
                if plan:
                    break
        if plan:
            self._last_step_s[plan.model] = now
        return SchedulerOutput(plan, dropped)

    def _saab(self, now, decodable) -> Optional[StepPlan]:
        # A decode batch that has waited too long goes first: TPOT matters too.
        dm = pick_decode_model(decodable, self._last_step_s)
        if dm is not None and now - self._last_step_s.get(dm, -1e9) > self.config.max_decode_gap_s:
            plan = self._decode_plan(dm, decodable)
            if plan:
                return plan
            decodable = None  # it preempted sequences: recompute below
        # Prefill the model whose most urgent request has the least slack.
        best, best_slack = None, None
        for m, seqs in self.running.items():
            for s in seqs:
                if s.num_pending_prefill > 0:
                    slack = (float("inf") if s.low_priority or s.slo_ttft_s is None
                             else s.deadline_s - now - self.cost.prefill_time(m, s.num_pending_prefill, 1))
                    if best_slack is None or (slack, s.arrival_s) < best_slack:
                        best, best_slack = m, (slack, s.arrival_s)
        if best is not None:
            plan = self._prefill_plan(best, now, True)
            if plan:
                return plan
        if decodable is None:  # else unchanged: planning a prefill does not change sequences
            decodable = self._decodable()
        dm = pick_decode_model(decodable, self._last_step_s)
        return self._decode_plan(dm, decodable) if dm else None

    # -- after a step -------------------------------------------------------------------
    def observe(self, plan: StepPlan, result: StepResult) -> None:
        """Feed a device-bound step time back into the step-time profile."""
        if result.device_seconds is not None:
            self.cost.observe(plan.model, plan.kind,
                              result.bucket if result.bucket is not None else plan.size,
                              result.device_seconds)

    def on_step_done(self, plan: StepPlan, tokens: Sequence[int], now: float) -> List[RequestState]:
        """Apply a step's sampled tokens; return the sequences that finished now."""
        finished = []
        caching = self._cache_of is not None
        for s, n, tok in zip(plan.seqs, plan.chunks, tokens):
            if s.status is not Status.RUNNING:
                continue
            s.num_computed += n
            if caching:
                self._register_full_blocks(s)
            num_tokens = s.num_tokens  # (once: this loop runs for every row of every step)
            if s.num_computed < num_tokens:
                continue  # a prefill chunk that is not the last: no token yet
            tok = int(tok)
            s.output_token_ids.append(tok)
            s.token_times_s.append(now)
            if s.first_token_s is None:
                s.first_token_s = now
            reason = None
            if tok in s.stop_ids:
                reason = "stop"
            elif len(s.output_token_ids) >= s.sampling.max_tokens or num_tokens + 1 >= s.max_len:
                reason = "length"
            if reason:
                self.release(s)
                s.end(Status.FINISHED, now, reason)
                finished.append(s)
        return finished

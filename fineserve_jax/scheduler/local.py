"""The per-device local scheduler: admission into KV memory, then execution (which model
steps with which requests), over the shared slab allocator. Pure Python: the engine and
the simulator both drive it."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from fineserve_jax.core.request import RequestState, Status
from fineserve_jax.kvslab import OutOfKVMemory, SlabAllocator
from fineserve_jax.scheduler.admission import admission_key, order_waiting
from fineserve_jax.scheduler.execution import (
    EXECUTION_POLICIES,
    ModelLimits,
    StepPlan,
    pack_prefill,
    pick_decode_model,
)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """The scheduler's static knowledge of one model on this device."""

    name: str
    preset: str
    block_bytes: int
    tokens_per_block: int
    limits: ModelLimits


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

    def __post_init__(self):
        if self.execution not in EXECUTION_POLICIES:
            raise ValueError(f"unknown execution policy {self.execution!r}; valid: "
                             f"{', '.join(EXECUTION_POLICIES)}")
        admission_key(self.admission, {}, self.aging_s)  # validates the name


class LocalScheduler:
    """`allocator` is the device's shared KV arena. `allocators` (optional, model name ->
    allocator) gives each model a static KV partition of its own instead (the baselines'
    memory model): admission then skips a model whose partition is full instead of waiting
    for it, and a decode that runs out of memory preempts the latest-admitted sequence of the
    same model (preempting another model's frees nothing for this one)."""

    def __init__(self, models: Dict[str, ModelEntry], allocator: Optional[SlabAllocator], cost,
                 config: SchedulerConfig = SchedulerConfig(),
                 allocators: Optional[Dict[str, SlabAllocator]] = None):
        self.models = models
        self.alloc = allocator
        self.allocators = allocators
        if allocators is not None:
            missing = set(models) - set(allocators)
            if missing:
                raise ValueError(f"no KV partition for model(s) {sorted(missing)}")
            self._alloc_of = {m: allocators[m] for m in models}
        elif allocator is None:
            raise ValueError("give a shared allocator or per-model allocators")
        else:
            self._alloc_of = {m: allocator for m in models}
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
        self.freed_log: Optional[List[tuple]] = None  # (model, block ids) when debugging

    # -- bookkeeping ------------------------------------------------------------------
    def add(self, seq: RequestState) -> None:
        if seq.model not in self.models:
            raise KeyError(seq.model)
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(self.running.values())

    def _grow(self, seq: RequestState, tokens: int) -> None:
        e = self.models[seq.model]  # runs for every decode row: keep it lean
        n = -(-tokens // e.tokens_per_block) - len(seq.block_ids)
        if n > 0:
            seq.block_ids += self._alloc_of[seq.model].allocate(block_bytes=e.block_bytes,
                                                                num_blocks=n)

    def release(self, seq: RequestState) -> None:
        """Free a sequence's blocks and forget it (it ended or was preempted)."""
        if seq.block_ids:
            self._alloc_of[seq.model].free(block_bytes=self.models[seq.model].block_bytes,
                                           block_ids=seq.block_ids)
            if self.freed_log is not None:
                self.freed_log.append((seq.model, seq.block_ids))
            seq.block_ids = []
        if seq in self.running.get(seq.model, ()):
            self.running[seq.model].remove(seq)
            self._admit_order.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: RequestState) -> None:
        self.release(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0  # recompute: prompt + output so far are prefilled again
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)

    # -- stage 1: admission ---------------------------------------------------------------
    def _admit(self, now: float) -> None:
        full = set()  # static partitions: models whose partition cannot take their head
        for seq in order_waiting(self.waiting, self._key, now):
            if seq.model in full:
                continue
            try:
                self._grow(seq, seq.num_tokens)
            except OutOfKVMemory:
                if self.allocators is None:
                    break  # strict priority order: aging guarantees the head gets in eventually
                full.add(seq.model)  # strict order within the model; other partitions go on
                continue
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            seq.admitted_s = now
            self.running[seq.model].append(seq)
            self._admit_order.append(seq)

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
                m = s.model
                if now + self.cost.prefill_time(m, s.num_tokens, 1) > s.deadline_s:
                    if self.config.drop:
                        self.waiting.remove(s)
                        dropped.append(s)
                    else:
                        s.low_priority = True

    def _prefill_plan(self, model: str, now: float, slo_aware: bool) -> Optional[StepPlan]:
        pending = [s for s in self.running[model] if s.num_pending_prefill > 0]
        if not pending:
            return None
        if slo_aware:
            pending.sort(key=lambda s: (s.low_priority, s.deadline_s, s.arrival_s))
        else:
            pending.sort(key=lambda s: s.arrival_s)
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
        """The latest-admitted running sequence whose blocks would relieve `model`."""
        if self.allocators is None:
            return self._admit_order[-1]
        return next(s for s in reversed(self._admit_order) if s.model == model)

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
    def on_step_done(self, plan: StepPlan, tokens: List[int], now: float) -> List[RequestState]:
        """Apply a step's sampled tokens; return the sequences that finished now."""
        finished = []
        for s, n, tok in zip(plan.seqs, plan.chunks, tokens):
            if s.status is not Status.RUNNING:
                continue
            s.num_computed += n
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

"""The one per-device loop, shared by the engine and the simulator (pure Python).

One iteration:

    now = clock.now(); take in the requests that have arrived by `now` (one submission rule)
    every `compaction_interval` steps while requests wait: compact KV slabs
    scheduler.schedule(now) -> a step plan + the requests it dropped (they end here)
    executor.run(plan) -> tokens, seconds  (arrivals are taken in while the device runs)
    clock.step_done(seconds); the scheduler applies the tokens; finished requests end
    freed blocks go to the executor (debug poisoning); KV use is sampled

Only the executor (and the clock) differ between serving and simulating. Every request ends
exactly once: finished, dropped or failed with a reason; a request that breaks while its
step is prepared fails alone; a step that fails as a whole fails its requests, and if the
device lost its KV the running requests are recomputed; nothing makes the loop raise for
one request's sake.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from fineserve_jax.core.clock import Clock
from fineserve_jax.core.executor import Executor, RequestFault
from fineserve_jax.core.request import Request, RequestState, Status
from fineserve_jax.core.sampling_params import SamplingParams, stop_ids
from fineserve_jax.core.step_plan import StepPlan
from fineserve_jax.core.submission import check_request


class LoopBroken(RuntimeError):
    """The device loop cannot serve any more (its executor could not recover)."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """compaction_interval: compact every this many steps while requests wait (0: never);
    compaction_max_moves: block moves per compaction; kv_sample_interval_s: sample KV use on
    this grid of seconds (None: once per step)."""

    compaction_interval: int = 0
    compaction_max_moves: int = 64
    kv_sample_interval_s: Optional[float] = None

    def __post_init__(self):
        for name in ("compaction_interval", "compaction_max_moves"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        k = self.kv_sample_interval_s
        if k is not None and not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
            raise ValueError(f"kv_sample_interval_s must be None or a number > 0, got {k!r}")


class StepRecord(NamedTuple):
    """One step as it ran (for benchmarks and replays)."""

    model: str
    kind: str
    rows: int
    bucket: int
    seconds: float
    device_seconds: Optional[float]


@dataclasses.dataclass
class LoopStats:
    steps: int = 0
    prefill_steps: int = 0
    busy_s: float = 0.0  # seconds spent in steps
    prefill_busy_s: float = 0.0  # of which in prefill steps
    failed_steps: int = 0
    recoveries: int = 0
    compaction_runs: int = 0
    moved_blocks: int = 0
    moved_bytes: int = 0
    freed_slabs: int = 0

    def compaction(self) -> dict:
        return {"runs": self.compaction_runs, "moved_blocks": self.moved_blocks,
                "moved_bytes": self.moved_bytes, "freed_slabs": self.freed_slabs}


class DeviceLoop:
    """Serves requests on one device: the scheduler decides, the executor runs.

    scheduler: a `scheduler.local.LocalScheduler` (its `models` are the `ModelEntry`s).
    tokenizers: model name -> object with `.encode(str) -> ids` (text prompts; optional).
    """

    def __init__(self, scheduler, executor: Executor, clock: Clock, *,
                 tokenizers: Optional[Mapping[str, object]] = None,
                 config: LoopConfig = LoopConfig()):
        self.scheduler = scheduler
        self.executor = executor
        self.clock = clock
        self.config = config
        self.models = scheduler.models
        self._encode = {m: t.encode for m, t in (tokenizers or {}).items() if t is not None}
        self._served = ", ".join(self.models)
        self._capacity = {m: scheduler.capacity_blocks(m) for m in self.models}
        self._track_freed = bool(getattr(executor, "wants_freed_blocks", False))
        self.states: Dict[int, RequestState] = {}  # request id -> the first request of that id
        self.ended: List[RequestState] = []
        self._all: List[RequestState] = []  # every submitted request, duplicates included
        self._next_id = 0
        self.kv_samples: List[Tuple[float, int, int]] = []
        self._next_kv = 0.0
        self.step_log: Optional[List[StepRecord]] = None  # set to a list to record every step
        self.stats = LoopStats()
        self.broken: Optional[str] = None

    def set_scheduler(self, scheduler) -> None:
        """Serve with another scheduler from now on (nothing may be in flight); the request
        history (ids, records) is kept."""
        if self.scheduler.has_work:
            raise RuntimeError("set_scheduler with requests in flight")
        self.scheduler = scheduler
        self.models = scheduler.models
        self._served = ", ".join(self.models)
        self._capacity = {m: scheduler.capacity_blocks(m) for m in self.models}

    # -- submission -------------------------------------------------------------------------
    def submit(self, req: Request, now: Optional[float] = None) -> RequestState:
        """Queue a request; a request the device could never serve fails at once with a
        reason (at its arrival time) and never reaches the scheduler."""
        rid = getattr(req, "request_id", None)
        duplicate = rid is not None and rid in self.states
        if rid is None or not isinstance(rid, int) or isinstance(rid, bool) or rid < 0:
            rid = self._next_id
        self._next_id = max(self._next_id, rid + 1)
        model = getattr(req, "model", None)
        entry = self.models.get(model) if isinstance(model, str) else None
        ids, error = check_request(req, entry, self._served, self._capacity.get(model, 0),
                                   self._encode.get(model))
        if duplicate and error is None:
            error = f"duplicate request id {rid}: a request with this id was already submitted"
        arrival = getattr(req, "arrival_s", None)
        if not isinstance(arrival, (int, float)) or not math.isfinite(arrival):
            arrival = now if now is not None else self.clock.now()
        sampling = req.sampling if error is None else SamplingParams()
        seq = RequestState(
            request_id=rid, model=model if isinstance(model, str) else repr(model),
            prompt_token_ids=ids or [], sampling=sampling, arrival_s=float(arrival),
            slo_ttft_s=req.slo_ttft_s if error is None else None,
            stop_ids=frozenset(stop_ids(sampling, entry.eos_token_id)) if error is None else frozenset(),
            max_len=entry.max_len if entry is not None else 0)
        if not duplicate:
            self.states[rid] = seq
        self._all.append(seq)
        if error:
            self._end(seq, Status.FAILED, seq.arrival_s, error)
        else:
            self.scheduler.add(seq)
        return seq

    def _end(self, seq: RequestState, status: Status, now: float, reason: Optional[str]) -> None:
        seq.end(status, now, reason)
        self.ended.append(seq)

    def _fail(self, seq: RequestState, now: float, reason: str) -> None:
        if seq.status.is_final:
            return
        self.scheduler.release(seq)
        self._end(seq, Status.FAILED, now, reason)

    # -- one iteration ----------------------------------------------------------------------
    def step(self, take_arrivals: Optional[Callable[[float], None]] = None) -> bool:
        """One scheduler iteration; False when there was no step to run.

        take_arrivals(now): submits the requests that have arrived by `now`; called at the
        start of the iteration and once more while the device runs the step."""
        if self.broken:
            raise LoopBroken(self.broken)
        now = self.clock.now()
        if take_arrivals is not None:
            take_arrivals(now)
        self._sample_kv(now)
        cfg = self.config
        if (cfg.compaction_interval and self.scheduler.waiting
                and self.stats.steps % cfg.compaction_interval == 0):
            self.compact()
        out = self.scheduler.schedule(now)
        for s in out.dropped:
            self._end(s, Status.DROPPED, now, "slo")
        self._release_freed()  # before the step writes KV into re-allocated blocks
        plan = out.step
        if plan is None:
            return False
        overlap = (lambda: take_arrivals(self.clock.now())) if take_arrivals else (lambda: None)
        try:
            result = self.executor.run(plan, overlap)
        except RequestFault as f:
            self._fail(f.seq, now, f"could not run this request: {f.reason}")
            self._release_freed()
            return True
        except Exception as e:  # noqa: BLE001 - a step failure must not take the device down
            self._step_failed(plan, now, e)
            return True
        t_end = self.clock.step_done(result.seconds)
        st = self.stats
        st.steps += 1
        st.busy_s += result.seconds
        if plan.kind == "prefill":
            st.prefill_steps += 1
            st.prefill_busy_s += result.seconds
        if self.step_log is not None:
            self.step_log.append(StepRecord(plan.model, plan.kind, len(plan.seqs),
                                            result.bucket or plan.size, result.seconds,
                                            result.device_seconds))
        self.scheduler.observe(plan, result)
        for s in self.scheduler.on_step_done(plan, result.tokens, t_end):
            self.ended.append(s)
        self._release_freed()
        return True

    def _step_failed(self, plan: StepPlan, now: float, e: Exception) -> None:
        self.stats.failed_steps += 1
        reason = f"step failed: {type(e).__name__}: {e}"
        for s in plan.seqs:
            self._fail(s, now, reason)
        try:
            lost = self.executor.recover()
        except Exception as r:  # noqa: BLE001
            self.broken = (f"the device could not recover after a failed {plan.kind} step of "
                           f"{plan.model!r} ({reason}); recovery raised {type(r).__name__}: {r}")
            for s in list(self.scheduler.waiting) + [x for v in self.scheduler.running.values() for x in v]:
                self._fail(s, now, self.broken)
            return
        if lost:  # the device state (KV) is gone: recompute everything that was running
            self.stats.recoveries += 1
            self.scheduler.preempt_all()
        self._release_freed()

    def _release_freed(self) -> None:
        if self._track_freed:
            for block_bytes, ids in self.scheduler.drain_freed():
                self.executor.release_blocks(block_bytes, ids)

    def _sample_kv(self, now: float) -> None:
        interval = self.config.kv_sample_interval_s
        if interval is None:
            used, reserved = self.scheduler.kv_usage()
            self.kv_samples.append((now, used, reserved))
            return
        if now >= self._next_kv:
            used, reserved = self.scheduler.kv_usage()
            while now >= self._next_kv:
                self.kv_samples.append((self._next_kv, used, reserved))
                self._next_kv += interval

    def compact(self) -> int:
        """Move live blocks out of the sparsest slabs so they return to the common pool:
        device copy, then the scheduler's bookkeeping and block-table rewrite. Returns the
        number of slabs freed."""
        plans = self.scheduler.plan_compaction(self.config.compaction_max_moves)
        if not plans:
            return 0
        for _, plan in plans:
            for b in plan.block_sizes:
                moves = [m for m in plan.moves if m.block_bytes == b]
                self.executor.copy_blocks(b, [m.src for m in moves], [m.dst for m in moves])
        freed = self.scheduler.apply_compaction(plans)
        if self._track_freed:  # a stale table entry would now read poison
            for _, plan in plans:
                for b in plan.block_sizes:
                    self.executor.release_blocks(b, [m.src for m in plan.moves if m.block_bytes == b])
        st = self.stats
        st.compaction_runs += 1
        st.moved_blocks += sum(p.num_moves for _, p in plans)
        st.moved_bytes += sum(p.moved_bytes for _, p in plans)
        st.freed_slabs += freed
        return freed

    # -- driving a workload -----------------------------------------------------------------
    def run(self, requests: Sequence[Request], realtime: bool = True,
            on_iteration: Optional[Callable[["DeviceLoop"], None]] = None) -> List[RequestState]:
        """Serve `requests` to the end; returns their states in the order given.

        realtime: each request arrives at its `arrival_s` (seconds after this call starts);
        otherwise all are queued at once. on_iteration(loop): called after every iteration
        (progress bars, time series of an experiment)."""
        if self.broken:
            raise LoopBroken(self.broken)
        self.clock.reset()
        if not self.scheduler.has_work:  # times of earlier runs mean nothing on the new clock
            self.scheduler.reset_time()
        self._next_kv = 0.0

        def arrival(i):
            a = getattr(requests[i], "arrival_s", 0.0)
            return a if isinstance(a, (int, float)) and math.isfinite(a) else -math.inf

        order = sorted(range(len(requests)), key=arrival) if realtime else list(range(len(requests)))
        states: List[Optional[RequestState]] = [None] * len(requests)
        nxt = 0

        def take_arrivals(now: float) -> None:
            nonlocal nxt
            while nxt < len(order) and (not realtime or arrival(order[nxt]) <= now):
                i = order[nxt]
                req = requests[i]
                if not realtime and isinstance(req, Request):
                    req = dataclasses.replace(req, arrival_s=now)
                states[i] = self.submit(req, now)
                nxt += 1

        stalled = 0
        while True:
            ran = self.step(take_arrivals)
            if on_iteration is not None:
                on_iteration(self)
            if self.broken:  # every request in flight failed with the reason; so do the rest
                for i in order[nxt:]:
                    states[i] = self.submit(requests[i], self.clock.now())
                    self._fail(states[i], states[i].arrival_s, self.broken)
                break
            if ran:
                stalled = 0
                continue
            if nxt == len(order) and not self.scheduler.has_work:
                break
            if self.scheduler.has_work:
                # Nothing ran although requests wait: twice in a row with nothing running
                # means they cannot be admitted even into an empty device. The submission
                # rule forbids that; never spin or hang if it happens anyway.
                # (With requests running a step always exists; a bound keeps a bug from
                # spinning forever.)
                stalled += 1
                if stalled >= (1000 if self.scheduler.num_running else 2):
                    now = self.clock.now()
                    stuck = list(self.scheduler.waiting) + [
                        x for v in self.scheduler.running.values() for x in v]
                    for s in stuck:
                        self._fail(s, now, "the scheduler made no progress with this request "
                                           "(it cannot be admitted even into an empty device)")
                    stalled = 0
                continue
            self.clock.idle_until(arrival(order[nxt]))
        return states

    # -- results ------------------------------------------------------------------------------
    def records(self):
        """Metric records of every request that ended (duplicates included)."""
        presets = {m: e.preset for m, e in self.models.items()}
        return [s.to_record(presets.get(s.model)) for s in self._all if s.status.is_final]

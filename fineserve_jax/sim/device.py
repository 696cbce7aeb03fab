"""One simulated device: the engine's local scheduler and slab allocator, driven by a
discrete-event loop whose step durations come from the cost model. Pure Python.

The loop is the engine's (`engine.device_engine.Engine.run`) with the device replaced by the
cost model: arrivals up to `now` are queued, the scheduler plans one step, the step "runs" for
its predicted time, arrivals during it are queued at its end, and the sampled tokens (a
constant; requests have `ignore_eos`) update the requests. The device idles until the next
arrival when there is nothing to run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import List, Optional, Sequence, Tuple

from fineserve_jax.core.request import RequestState, Status
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.kvslab import SlabAllocator, choose_slab_bytes, num_slabs_for_arena
from fineserve_jax.metrics import RequestRecord
from fineserve_jax.scheduler.execution import ModelLimits
from fineserve_jax.scheduler.footprint import Footprint, footprint
from fineserve_jax.scheduler.local import LocalScheduler, ModelEntry
from fineserve_jax.scheduler.plan import DevicePlan
from fineserve_jax.sim.config import SimConfig
from fineserve_jax.sim.step_cost import CostModelStepCost
from fineserve_jax.workload.spec import WorkloadRequest


@dataclasses.dataclass
class DeviceResult:
    """What one device did. Times in simulated seconds, except `wall_s`."""

    device_id: int
    records: List[RequestRecord]
    kv_samples: List[Tuple[float, int, int]]  # (t, used bytes, reserved bytes) on the grid
    kv_arena_bytes: int
    slab_bytes: Optional[int]  # None with static partitions
    num_slabs: int  # null slab(s) included; static: one block per slab, one null per model
    steps: int
    prefill_steps: int
    busy_s: float  # simulated seconds spent in steps
    end_s: float  # when the last request ended
    preemptions: int
    wall_s: float

    def stats(self) -> dict:
        return {"device": self.device_id, "requests": len(self.records), "steps": self.steps,
                "prefill_steps": self.prefill_steps, "busy_s": self.busy_s, "end_s": self.end_s,
                "utilization": self.busy_s / self.end_s if self.end_s > 0 else 0.0,
                "preemptions": self.preemptions, "kv_arena_bytes": self.kv_arena_bytes,
                "slab_bytes": self.slab_bytes, "num_slabs": self.num_slabs, "wall_s": self.wall_s}


class DeviceSim:
    """One device of a placement plan: its models, KV memory and local scheduler.

    KV memory: config.kv == "slab": one SlabAllocator over the device's whole arena, slab size
    from `choose_slab_bytes` over the models' real block sizes; "static": one allocator per
    model over its `kv_partition_bytes` (one block per slab, i.e. a plain block pool).
    """

    def __init__(self, device: DevicePlan, cost, config: SimConfig = SimConfig(),
                 tokens_per_block: int = 16, max_model_len: int = 4096):
        self.device = device
        self.config = config
        self.fp: dict = {m.name: footprint(m.config, m.preset, tokens_per_block) for m in device.models}
        self.presets = {m.name: m.preset for m in device.models}
        self.max_len = {n: f.max_len(max_model_len) for n, f in self.fp.items()}
        self.step_cost = CostModelStepCost(cost, {m.name: (m.config, m.preset) for m in device.models},
                                           device.tp, config.prefill_buckets, config.decode_buckets)
        limits = ModelLimits(config.max_prefill_tokens, config.max_prefill_seqs, config.max_decode_seqs)
        entries = {n: ModelEntry(n, self.presets[n], f.block_bytes, tokens_per_block, limits)
                   for n, f in self.fp.items()}
        self.arena_bytes = device.kv_arena_bytes
        if config.kv == "slab":
            blocks = [f.block_bytes for f in self.fp.values()]
            slab = config.slab_bytes or choose_slab_bytes(
                blocks, target_slab_bytes=max(config.slab_target_bytes, max(blocks))).slab_bytes
            self.slab_bytes: Optional[int] = slab
            self.allocator: Optional[SlabAllocator] = SlabAllocator(
                num_slabs_for_arena(device.kv_arena_bytes, slab), slab)
            self.allocators = None
            # Blocks one sequence can ever get: every slab but the null one.
            self._capacity = {n: (self.allocator.num_slabs - 1) * (slab // f.block_bytes)
                              for n, f in self.fp.items()}
        else:
            self.slab_bytes = None
            self.allocator = None
            self.allocators = {}
            for m in device.models:
                part = m.kv_partition_bytes
                if part is None:  # a hand-written plan: split the arena evenly
                    part = device.kv_arena_bytes // len(device.models)
                b = self.fp[m.name].block_bytes
                self.allocators[m.name] = SlabAllocator(num_slabs_for_arena(part, b), b)
            self._capacity = {n: a.num_slabs - 1 for n, a in self.allocators.items()}
        self.scheduler = LocalScheduler(entries, self.allocator, self.step_cost, config.scheduler,
                                        allocators=self.allocators)

    # -- KV accounting --
    def _kv_state(self) -> Tuple[int, int]:
        """(bytes in live blocks, bytes reserved for KV: formatted slabs / whole partitions)."""
        if self.allocator is not None:
            a = self.allocator
            return a.used_bytes, (a.num_slabs - 1 - a.free_slabs) * a.slab_bytes
        used = sum(a.used_bytes for a in self.allocators.values())
        return used, sum(a.total_bytes - a.slab_bytes for a in self.allocators.values())

    def _problem(self, w: WorkloadRequest) -> Optional[str]:
        """Why the engine would refuse this request at submission (None: fine)."""
        limit = self.max_len[w.model]
        if w.prompt_len >= limit:
            return (f"prompt of {w.prompt_len} tokens exceeds the model's maximum of {limit - 1} "
                    f"prompt tokens (context {limit})")
        f: Footprint = self.fp[w.model]
        need = f.kv_format.blocks_for_tokens(w.prompt_len + 1)
        if need > self._capacity[w.model]:
            return f"prompt needs {need} KV blocks but the arena holds only {self._capacity[w.model]}"
        return None

    # -- the event loop --
    def run(self, requests: Sequence[WorkloadRequest]) -> DeviceResult:
        """Serve `requests` (this device's share, any order) to the end."""
        t_wall = time.perf_counter()
        cfg = self.config
        reqs = sorted(requests, key=lambda w: (w.arrival_s, w.request_id))
        sched, cost = self.scheduler, self.step_cost
        tokens = [cfg.token_id] * max(cfg.max_decode_seqs, cfg.max_prefill_seqs)
        states: List[RequestState] = []
        dt_kv = cfg.kv_sample_interval_s
        next_kv, kv_samples = 0.0, []
        steps = prefill_steps = 0
        busy = 0.0
        now, i, n = 0.0, 0, len(reqs)
        idle_since = 0.0  # the device starts idle
        while True:
            while i < n and reqs[i].arrival_s <= now:
                w = reqs[i]
                i += 1
                s = RequestState(
                    request_id=w.request_id, model=w.model, prompt_token_ids=[cfg.token_id] * w.prompt_len,
                    sampling=SamplingParams(max_tokens=int(w.output_len), ignore_eos=True),
                    arrival_s=w.arrival_s, slo_ttft_s=w.slo_ttft_s, max_len=self.max_len[w.model])
                states.append(s)
                problem = self._problem(w)
                if problem:
                    s.end(Status.FAILED, w.arrival_s, problem)
                else:
                    sched.add(s)
            while now >= next_kv:
                used, reserved = self._kv_state()
                kv_samples.append((next_kv, used, reserved))
                next_kv += dt_kv
            out = sched.schedule(now)
            for s in out.dropped:
                s.end(Status.DROPPED, now, "slo")
            plan = out.step
            if plan is None:
                if i < n:
                    if idle_since is None:
                        idle_since = now
                    now = max(now, reqs[i].arrival_s)  # idle until the next arrival
                    continue
                if sched.has_work:  # cannot happen for validated requests; never hang
                    for s in list(sched.waiting):
                        sched.release(s)
                        s.end(Status.FAILED, now, "no runnable step (KV memory)")
                    continue
                break
            dt = cost.step_time(plan)
            if idle_since is not None:
                if cfg.wakeup_s and now - idle_since >= cfg.wakeup_idle_s:
                    dt += cfg.wakeup_s  # the first step after an idle spell runs cold
                idle_since = None
            steps += 1
            if plan.kind == "prefill":
                prefill_steps += 1
            busy += dt
            now += dt
            sched.on_step_done(plan, tokens, now)
        end = max((s.finish_s for s in states), default=0.0)
        return DeviceResult(
            device_id=self.device.id, records=[s.to_record(self.presets[s.model]) for s in states],
            kv_samples=kv_samples, kv_arena_bytes=self.arena_bytes, slab_bytes=self.slab_bytes,
            num_slabs=(self.allocator.num_slabs if self.allocator is not None
                       else sum(a.num_slabs for a in self.allocators.values())),
            steps=steps, prefill_steps=prefill_steps, busy_s=busy, end_s=end,
            preemptions=sched.num_preemptions, wall_s=time.perf_counter() - t_wall)

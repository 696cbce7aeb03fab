"""One simulated device: the one device loop (`core.loop.DeviceLoop`, the engine's) with the
cost model as its executor and a virtual clock. Pure Python.

Same scheduler, same slab allocator and slab sizing (`kvslab.device_slab_bytes`), same
submission rule and request lifecycle as the engine; only step durations (the cost model)
and sampled tokens (a constant; requests have `ignore_eos`) are simulated.
"""

from __future__ import annotations

import dataclasses
import time
from typing import List, Optional, Sequence, Tuple

from fineserve_jax.core.clock import VirtualClock
from fineserve_jax.core.loop import DeviceLoop, LoopConfig
from fineserve_jax.core.model_entry import ModelEntry, ModelLimits
from fineserve_jax.core.request import Request
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.kvslab import SlabAllocator, device_slab_bytes, num_slabs_for_arena
from fineserve_jax.metrics import RequestRecord
from fineserve_jax.scheduler.footprint import footprint
from fineserve_jax.scheduler.local import LocalScheduler
from fineserve_jax.scheduler.plan import DevicePlan
from fineserve_jax.scheduler.step_cost import CostModelStepCost
from fineserve_jax.sim.config import SimConfig
from fineserve_jax.sim.executor import CostModelExecutor
from fineserve_jax.workload.spec import WorkloadRequest

SIM_VOCAB = 32000  # prompt token ids of simulated requests (their content matters for caching)


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
    prefill_busy_s: float  # of which in prefill steps
    end_s: float  # when the last request ended
    preemptions: int
    wall_s: float
    prefix_cache: Optional[dict] = None  # the scheduler's prefix-cache counters (None: off)

    def stats(self) -> dict:
        return {"device": self.device_id, "requests": len(self.records), "steps": self.steps,
                "prefill_steps": self.prefill_steps, "busy_s": self.busy_s,
                "prefill_busy_s": self.prefill_busy_s, "end_s": self.end_s,
                "utilization": self.busy_s / self.end_s if self.end_s > 0 else 0.0,
                "preemptions": self.preemptions, "kv_arena_bytes": self.kv_arena_bytes,
                "slab_bytes": self.slab_bytes, "num_slabs": self.num_slabs, "wall_s": self.wall_s}


class DeviceSim:
    """One device of a placement plan: its models, KV memory and local scheduler.

    KV memory: config.kv == "slab": one SlabAllocator over the device's whole arena with the
    device arena's slab size; "static": one allocator per model over its `kv_partition_bytes`
    (one block per slab, i.e. a plain block pool).
    """

    def __init__(self, device: DevicePlan, cost, config: SimConfig = SimConfig(),
                 tokens_per_block: int = 16, max_model_len: int = 4096):
        self.device = device
        self.config = config
        fps = {m.name: footprint(m.config, m.preset, tokens_per_block, device.tp) for m in device.models}
        self.presets = {m.name: m.preset for m in device.models}
        limits = ModelLimits(config.max_prefill_tokens, config.max_prefill_seqs, config.max_decode_seqs)
        entries = {n: ModelEntry(n, self.presets[n], f.block_bytes, tokens_per_block, limits,
                                 max_len=f.max_len(max_model_len))
                   for n, f in fps.items()}
        self.step_cost = CostModelStepCost(cost, {m.name: (m.config, m.preset) for m in device.models},
                                           device.tp, config.prefill_buckets, config.decode_buckets)
        self.arena_bytes = device.kv_arena_bytes
        allocator, allocators = None, None
        if config.kv == "slab":
            slab = config.slab_bytes or device_slab_bytes(
                [f.block_bytes for f in fps.values()], config.slab_target_bytes)
            self.slab_bytes: Optional[int] = slab
            allocator = SlabAllocator(num_slabs_for_arena(device.kv_arena_bytes, slab), slab)
            self.num_slabs = allocator.num_slabs
        else:
            self.slab_bytes = None
            allocators = {}
            for m in device.models:
                part = m.kv_partition_bytes
                if part is None:  # a hand-written plan: split the arena evenly
                    part = device.kv_arena_bytes // len(device.models)
                b = fps[m.name].block_bytes
                allocators[m.name] = SlabAllocator(num_slabs_for_arena(part, b), b)
            self.num_slabs = sum(a.num_slabs for a in allocators.values())
        self.scheduler = LocalScheduler(entries, allocator, self.step_cost, config.scheduler,
                                        allocators=allocators, prefix_caching=config.prefix_caching)
        self.clock = VirtualClock()
        self.executor = CostModelExecutor(self.step_cost, self.clock, config.token_id,
                                          config.wakeup_s, config.wakeup_idle_s)
        self.loop = DeviceLoop(self.scheduler, self.executor, self.clock,
                               config=LoopConfig(config.compaction_interval,
                                                 config.compaction_max_moves,
                                                 config.kv_sample_interval_s))

    @staticmethod
    def request(w: WorkloadRequest) -> Request:
        """The request a workload entry stands for: its prompt tokens (shared prefixes
        included, so prefix caching sees what the engine would), `output_len` tokens
        generated (ignore_eos)."""
        return Request(w.model, w.prompt_tokens(SIM_VOCAB),
                       SamplingParams(max_tokens=int(w.output_len), ignore_eos=True),
                       arrival_s=w.arrival_s, slo_ttft_s=w.slo_ttft_s, request_id=w.request_id)

    def run(self, requests: Sequence[WorkloadRequest]) -> DeviceResult:
        """Serve `requests` (this device's share, any order) to the end."""
        t_wall = time.perf_counter()
        reqs = sorted(requests, key=lambda w: (w.arrival_s, w.request_id))
        states = self.loop.run([self.request(w) for w in reqs], realtime=True)
        st = self.loop.stats
        return DeviceResult(
            device_id=self.device.id, records=self.loop.records(),
            kv_samples=self.loop.kv_samples, kv_arena_bytes=self.arena_bytes,
            slab_bytes=self.slab_bytes, num_slabs=self.num_slabs, steps=st.steps,
            prefill_steps=st.prefill_steps, busy_s=st.busy_s, prefill_busy_s=st.prefill_busy_s,
            end_s=max((s.finish_s for s in states), default=0.0),
            preemptions=self.scheduler.num_preemptions, wall_s=time.perf_counter() - t_wall,
            prefix_cache=self.scheduler.prefix_cache_stats())

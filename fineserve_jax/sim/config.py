"""Simulator configuration and the systems compared in the experiments. Pure Python.

A *system* is a placement policy plus a device configuration: how KV memory is shared and how
the local scheduler admits and batches. The baselines are configurations of the same
simulator, never separate code paths:

    fineserve         FineServe placement, one shared KV arena (KV slab), deadline admission,
                      SLO-aware adaptive batching (saab) that drops hopeless requests
    muxserve          MuxServe-style greedy placement, static per-model KV partitions, FCFS
                      admission, round-robin batching across models, no dropping
    prism             Prism KV-pressure placement, shared KV arena, deadline admission,
                      round-robin batching, no dropping (the scheduler's "fcfs" execution steps
                      only the model of the oldest running request, which starves co-located
                      models: 50 % SLO attainment on two models even at low load)
    spatial           dedicated GPUs per model, static KV, FCFS, no dropping
  ablations (which half of FineServe matters):
    fineserve-static  FineServe placement and scheduling, static KV partitions
    fineserve-rr      FineServe placement, KV slab, round-robin batching, no dropping
    muxserve-slab     MuxServe placement and batching on a shared KV slab
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

from fineserve_jax.scheduler.local import SchedulerConfig

KV_MODES = ("slab", "static")
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """How each simulated device runs.

    kv: "slab" (one arena shared by the device's models, memory moves at slab granularity) or
      "static" (each model its own partition, sized by the plan's kv_partition_bytes).
    max_prefill_tokens / max_prefill_seqs / max_decode_seqs: the step limits (ModelLimits),
      like vLLM's max_num_batched_tokens and max_num_seqs.
    slab_target_bytes: preferred slab size (`kvslab.device_slab_bytes`, the engine's rule: the
      least common multiple of the block sizes scaled up to near this).
    slab_bytes: an exact slab size instead (e.g. an engine's, to mirror it); a multiple of
      every block size is wasteless.
    prefill_buckets / decode_buckets: fixed step shapes to charge (prompt tokens / decode
      batch rounded up to the next bucket, as in an engine with compiled buckets); None: exact.
    wakeup_s / wakeup_idle_s: seconds added to the first step after the device idled for at
      least wakeup_idle_s. A CPU backend pays this (its thread pool and caches go cold: +1.1 ms
      after 100 ms idle on the dev machine, measured by experiments.profile); 0 by default.
    kv_sample_interval_s: KV-use samples every this many simulated seconds.
    compaction_interval / compaction_max_moves: compact KV slabs every this many steps while
      requests wait (0: never; the engine's default is 16), at most this many block moves.
    prefix_caching: share the KV of cached prompt prefixes (the engine's prefix cache).
    workers: processes simulating devices in parallel (devices are independent given the
      plan and the routing); 0 = os.cpu_count().
    """

    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    kv: str = "slab"
    max_prefill_tokens: int = 8192
    max_prefill_seqs: int = 64
    max_decode_seqs: int = 256
    slab_target_bytes: int = 64 * MiB
    slab_bytes: Optional[int] = None
    prefill_buckets: Optional[Tuple[int, ...]] = None
    decode_buckets: Optional[Tuple[int, ...]] = None
    wakeup_s: float = 0.0
    wakeup_idle_s: float = 0.005
    kv_sample_interval_s: float = 1.0
    token_id: int = 7  # every sampled token (ignore_eos: generation runs to max_tokens)
    compaction_interval: int = 0
    compaction_max_moves: int = 64
    prefix_caching: bool = True
    workers: int = 1

    def __post_init__(self):
        if self.kv not in KV_MODES:
            raise ValueError(f"unknown KV mode {self.kv!r}; valid: {', '.join(KV_MODES)}")
        for f in ("max_prefill_tokens", "max_prefill_seqs", "max_decode_seqs"):
            if getattr(self, f) < 1:
                raise ValueError(f"SimConfig.{f} must be >= 1, got {getattr(self, f)}")
        if not self.kv_sample_interval_s > 0:
            raise ValueError(f"kv_sample_interval_s must be > 0, got {self.kv_sample_interval_s}")


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    placement: str  # placement policy (scheduler.placement.POLICIES)
    sim: SimConfig

    def with_sim(self, **kw) -> "System":
        return dataclasses.replace(self, sim=dataclasses.replace(self.sim, **kw))


_SAAB = SchedulerConfig(admission="deadline", execution="saab", drop=True)
_RR = SchedulerConfig(admission="fcfs", execution="round_robin", drop=False)
_FCFS = SchedulerConfig(admission="fcfs", execution="fcfs", drop=False)
_PRISM = SchedulerConfig(admission="deadline", execution="round_robin", drop=False)

SYSTEMS: Dict[str, System] = {s.name: s for s in (
    System("fineserve", "fineserve", SimConfig(scheduler=_SAAB, kv="slab")),
    System("muxserve", "muxserve", SimConfig(scheduler=_RR, kv="static")),
    System("prism", "prism", SimConfig(scheduler=_PRISM, kv="slab")),
    System("spatial", "spatial", SimConfig(scheduler=_FCFS, kv="static")),
    System("fineserve-static", "fineserve", SimConfig(scheduler=_SAAB, kv="static")),
    System("fineserve-rr", "fineserve", SimConfig(scheduler=_RR, kv="slab")),
    System("muxserve-slab", "muxserve", SimConfig(scheduler=_RR, kv="slab")),
)}


def get_system(name: str) -> System:
    try:
        return SYSTEMS[name]
    except KeyError:
        raise ValueError(f"unknown system {name!r}; valid: {', '.join(SYSTEMS)}") from None

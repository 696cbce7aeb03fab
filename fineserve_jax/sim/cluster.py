"""Simulating a whole cluster: route the workload over a placement plan's devices, simulate
each device's event loop on its own (devices are independent given the plan and the routing,
so they may run in parallel processes), and summarize in `experiments.serve`'s summary.json
schema. Pure Python."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

from fineserve_jax import metrics
from fineserve_jax.metrics import RequestRecord
from fineserve_jax.scheduler.placement import PlacementConfig, ServedModel, place
from fineserve_jax.scheduler.plan import ClusterSpec, PlacementPlan, check_plan
from fineserve_jax.sim.config import SimConfig, System
from fineserve_jax.sim.device import DeviceResult, DeviceSim
from fineserve_jax.cluster.routing import route
from fineserve_jax.workload.spec import WorkloadRequest


@dataclasses.dataclass
class SimResult:
    plan: PlacementPlan
    config: SimConfig
    devices: List[DeviceResult]
    unplaced: List[RequestRecord]  # requests for models the plan does not place (failed)
    num_requests: int
    last_arrival_s: float
    wall_s: float  # whole simulate() call
    system: Optional[str] = None

    @property
    def records(self) -> List[RequestRecord]:
        out = [r for d in self.devices for r in d.records] + list(self.unplaced)
        return sorted(out, key=lambda r: r.request_id)

    @property
    def duration_s(self) -> float:
        """Simulated seconds from t = 0 to the last request's end (or the last arrival)."""
        return max([self.last_arrival_s] + [d.end_s for d in self.devices])

    @property
    def steps(self) -> int:
        return sum(d.steps for d in self.devices)

    def summary(self) -> Dict[str, Any]:
        """`metrics.summarize` + "kv" (cluster and per device) + "compile" (None: nothing is
        compiled in a simulation) + "placement" (the plan) + "sim" (simulator statistics)."""
        plan = self.plan
        duration = self.duration_s
        arena = sum(d.kv_arena_bytes for d in self.devices)
        slabs = {d.slab_bytes for d in self.devices}
        s = metrics.summarize(
            self.records, duration_s=duration, kv_samples=_cluster_kv_samples(self.devices),
            slo_ttft_s={n: v for n, v in plan.model_slos().items() if v is not None},
            presets=plan.model_presets(), models=plan.model_names, kv_arena_bytes=arena,
            kv_slab_bytes=slabs.pop() if len(slabs) == 1 else None)
        s["kv"]["mode"] = self.config.kv
        s["kv"]["num_slabs"] = sum(d.num_slabs for d in self.devices)
        s["kv"]["preemptions"] = sum(d.preemptions for d in self.devices)
        s["kv"]["devices"] = [
            {"device": d.device_id, **metrics.kv_summary(d.kv_samples, arena_bytes=d.kv_arena_bytes,
                                                         slab_bytes=d.slab_bytes, end_s=_end(d, duration))}
            for d in self.devices]
        # Nothing is compiled in a simulation: the counts are unknown, not zero.
        s["compile"] = {"warmup_compiles": None, "steady_state_compiles": None, "warmup_s": None}
        stats = [d.prefix_cache for d in self.devices if d.prefix_cache is not None]
        summed = ({k: sum(st[k] for st in stats) for k in stats[0]} if stats else None)
        s["prefix_cache"] = metrics.prefix_cache_summary(summed, self.records)
        s["placement"] = plan.to_dict()
        s["sim"] = {"system": self.system, "wall_s": self.wall_s,
                    "device_wall_s": sum(d.wall_s for d in self.devices),
                    "steps": self.steps, "devices": [d.stats() for d in self.devices],
                    "gpus": plan.gpus_used, "num_devices": len(plan.devices),
                    "scheduler": dataclasses.asdict(self.config.scheduler), "kv": self.config.kv,
                    "limits": {"max_prefill_tokens": self.config.max_prefill_tokens,
                               "max_prefill_seqs": self.config.max_prefill_seqs,
                               "max_decode_seqs": self.config.max_decode_seqs}}
        metrics.check_conservation(s)
        return s


def _end(d: DeviceResult, duration: float) -> float:
    last = d.kv_samples[-1][0] if d.kv_samples else 0.0
    return max(duration, last)


def _cluster_kv_samples(devices: Sequence[DeviceResult]):
    """Sum the devices' grid samples (a device that stopped early keeps its last state)."""
    n = max((len(d.kv_samples) for d in devices), default=0)
    out = []
    for k in range(n):
        t = used = res = 0
        for d in devices:
            if not d.kv_samples:
                continue
            tk, u, r = d.kv_samples[min(k, len(d.kv_samples) - 1)]
            used += u
            res += r
            if k < len(d.kv_samples):
                t = tk
        out.append((t, used, res))
    return out


# Work shared with forked worker processes (read-only after fork, so nothing is pickled in).
_WORK: Dict[str, Any] = {}


def _init_worker(work: Dict[str, Any]) -> None:
    _WORK.update(work)


def _simulate_device(index: int) -> DeviceResult:
    w = _WORK
    dev = w["plan"].devices[index]
    sim = DeviceSim(dev, w["cost"], w["config"], w["plan"].tokens_per_block, w["plan"].max_model_len)
    return sim.run(w["routed"][dev.id])


def simulate(plan: PlacementPlan, requests: Sequence[WorkloadRequest], cost,
             config: SimConfig = SimConfig(), *, system: Optional[str] = None,
             check: bool = True) -> SimResult:
    """Simulate `requests` on `plan` (see the module docstring). `cost`: a CostModel."""
    t0 = time.perf_counter()
    if check:
        check_plan(plan)
    routed, unplaced = route(requests, plan, cost)
    failed = [RequestRecord(r.request_id, r.model, r.arrival_s, finish_s=r.arrival_s, status="failed",
                            finish_reason=f"model {r.model!r} is not placed", slo_ttft_s=r.slo_ttft_s,
                            prompt_len=r.prompt_len)
              for r in unplaced]
    # Biggest devices first, so parallel workers finish together.
    order = sorted(range(len(plan.devices)),
                   key=lambda i: -sum(r.output_len for r in routed[plan.devices[i].id]))
    workers = config.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(order)))
    work = dict(plan=plan, cost=cost, config=config, routed=routed)
    _WORK.update(work)
    try:
        if workers == 1:
            results = [_simulate_device(i) for i in order]
        else:
            # fork shares the work without pickling, but forking a process whose JAX
            # threads are running can deadlock: then spawn and ship the work once per worker.
            safe_fork = "fork" in multiprocessing.get_all_start_methods() and "jax" not in sys.modules
            ctx = multiprocessing.get_context("fork" if safe_fork else "spawn")
            init = {} if safe_fork else dict(initializer=_init_worker, initargs=(work,))
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **init) as ex:
                results = list(ex.map(_simulate_device, order))
    finally:
        _WORK.clear()
    results.sort(key=lambda d: d.device_id)
    return SimResult(plan, config, results, failed, len(requests),
                     max((r.arrival_s for r in requests), default=0.0), time.perf_counter() - t0, system)


def run_system(system: System, models: Sequence[ServedModel], cluster: ClusterSpec,
               requests: Sequence[WorkloadRequest], cost,
               placement: PlacementConfig = PlacementConfig(), workers: Optional[int] = None
               ) -> SimResult:
    """Place `models` with the system's policy, then simulate `requests` on the plan.
    Requests without an SLO get their model's placement SLO (given or FineServe's default)."""
    plan = place(models, cluster, cost, system.placement, placement)
    slos = plan.model_slos()
    reqs = [r if r.slo_ttft_s is not None else dataclasses.replace(r, slo_ttft_s=slos.get(r.model))
            for r in requests]
    config = system.sim if workers is None else dataclasses.replace(system.sim, workers=workers)
    return simulate(plan, reqs, cost, config, system=system.name)

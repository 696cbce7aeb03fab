"""A whole node of a placement plan served from one process.

One `Engine` per device group of the node, each on its own devices with its own arena (a
tensor-parallel group runs its models sharded over its GPUs). Requests are routed by the
router the simulator uses (`cluster.routing`: replicas least-loaded first), then every engine
serves its share in a thread of its own, so no group waits for another's host work: JAX
releases the GIL while a device runs a step, and the other threads schedule and dispatch
meanwhile (`NodeResult.overlap` measures it). All engines share the node's clock, so their
records lie on one timeline.

Every request ends exactly once: served by its engine (finished, dropped, failed), or
failed with a reason when its model is not on the node or its engine's thread died.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax

from fineserve_jax.cluster import summary as summary_lib
from fineserve_jax.cluster.routing import prompt_len, route_requests
from fineserve_jax.cluster.topology import local_gpus, node_devices, node_plan
from fineserve_jax.core.clock import WallClock
from fineserve_jax.core.request import Request
from fineserve_jax.engine.compile_counter import compile_count
from fineserve_jax.engine.device_engine import Engine, ModelSpec, RequestOutput
from fineserve_jax.engine.sharding import device_bytes
from fineserve_jax.loader import load_model
from fineserve_jax import metrics
from fineserve_jax.metrics import RequestRecord
from fineserve_jax.scheduler.plan import DevicePlan, PlacementPlan


class SharedClock(WallClock):
    """A wall clock started once for the whole node (or cluster): `reset` keeps the start, so
    every engine's loop reads the same timeline."""

    def __init__(self, t0: float):
        super().__init__()
        self._t0 = t0

    def reset(self) -> None:
        pass


def assign_ids(requests: Sequence[Request]) -> List[Request]:
    """The requests with an id each (the given ones kept; the rest numbered after them);
    raises ValueError on duplicate ids (routing and outputs are keyed by id)."""
    given = [r.request_id for r in requests if r.request_id is not None]
    if len(set(given)) != len(given):
        raise ValueError("request ids must be unique across the node/cluster")
    nxt = max(given, default=-1) + 1
    out = []
    for r in requests:
        if r.request_id is None:
            r = dataclasses.replace(r, request_id=nxt)
            nxt += 1
        out.append(r)
    return out


@dataclasses.dataclass
class Ended:
    """One request's end as the node reports it."""

    device: Optional[int]  # None: never reached a device
    output: RequestOutput
    record: RequestRecord


def failed_end(req: Request, reason: str, device: Optional[int] = None) -> Ended:
    """The end of a request that failed without being served (output and record)."""
    out = RequestOutput(request_id=req.request_id, model=req.model,
                        prompt_token_ids=list(req.prompt) if not isinstance(req.prompt, str) else [],
                        token_ids=[], text=None, status="failed", finish_reason=None, error=reason)
    rec = summary_lib.failed_record(req.request_id, req.model, req.arrival_s, reason,
                                    req.slo_ttft_s, prompt_len(req))
    return Ended(device, out, rec)


class NodeServer:
    """Every device group of node `node` of `plan`, one engine each (see the module doc).

    engine_kwargs: `Engine` options shared by the groups (buckets, scheduler, max_model_len,
    tokens_per_block, ...). arena_bytes_per_gpu: each GPU's arena (None: the plan's device
    arena / tp). Models get random weights of their plan config (`load_model(...,
    random_weights=True)`), built on their group's first device. The process must see the
    node's GPUs as local devices (on CPU: `XLA_FLAGS=--xla_force_host_platform_device_count=N`
    set before JAX starts, by whoever starts the process).
    """

    def __init__(self, plan: PlacementPlan, node: int, *, engine_kwargs: Optional[Mapping] = None,
                 arena_bytes_per_gpu: Optional[int] = None, dtype: str = "float32",
                 seed: int = 0, cost=None, log=None):
        self.plan, self.node = plan, node
        self.devices: List[DevicePlan] = node_devices(plan, node)
        self.scope = node_plan(plan, node)
        if cost is None:
            from fineserve_jax.scheduler.cost import load_cost_model
            cost = load_cost_model()
        self.cost = cost
        local = jax.devices()
        need = max(g for d in self.devices for g in local_gpus(plan, d)) + 1
        if len(local) < need:
            raise ValueError(
                f"node {node} uses local GPUs up to {need - 1} but this process has "
                f"{len(local)} {local[0].platform} devices; on CPU start it with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={plan.cluster.gpus_per_node}")
        kwargs = dict(engine_kwargs or {})
        kwargs.setdefault("dtype", dtype)
        kwargs.setdefault("seed", seed)
        self.engines: Dict[int, Engine] = {}
        t0 = time.perf_counter()
        for d in self.devices:
            devs = [local[g] for g in local_gpus(plan, d)]
            if log:
                log(f"node {node}: device {d.id} on {[str(x) for x in devs]}: "
                    f"{', '.join(f'{m.name}[{m.config}/{m.preset}]' for m in d.models)}")
            with jax.default_device(devs[0]):
                specs = [ModelSpec(m.name, load_model(m.config, quant=m.preset, dtype=dtype,
                                                      seed=seed, random_weights=True), m.preset)
                         for m in d.models]
            arena = arena_bytes_per_gpu or d.kv_arena_bytes // d.tp
            self.engines[d.id] = Engine(specs, arena_bytes=int(arena), devices=devs, **kwargs)
        self.startup_s = time.perf_counter() - t0
        self.warmup_compiles = sum(e.warmup_compiles for e in self.engines.values())
        self._c_ready = compile_count()
        self._threads: Dict[int, threading.Thread] = {}
        self._errors: Dict[int, str] = {}
        self._assigned: Dict[int, List[Request]] = {}
        self._unplaced: List[Ended] = []
        self._seen: Dict[int, int] = {}
        self._reported: set = set()
        self._t_start = self._t_end = None

    # -- routing ----------------------------------------------------------------------------
    def route(self, requests: Sequence[Request]) -> Tuple[Dict[int, List[Request]], List[Request]]:
        """({device id: its requests}, requests for models the node does not hold), by the
        shared router over this node's devices."""
        return route_requests(requests, self.scope, self.cost)

    # -- serving ----------------------------------------------------------------------------
    def start(self, per_device: Mapping[int, Sequence[Request]],
              unplaced: Sequence[Request] = (), epoch_t0: Optional[float] = None) -> None:
        """Serve the routed requests (arrival times in seconds after the start), one thread per
        engine; returns at once. `epoch_t0`: the start as a `time.time()` (a cluster driver's,
        so every node shares its timeline); default now. A node serves again once done."""
        if self._threads and not self.done:
            raise RuntimeError("this node is already serving")
        self._threads, self._errors, self._assigned, self._reported = {}, {}, {}, set()
        self._t_end = None
        unknown = set(per_device) - set(self.engines)
        if unknown:
            raise ValueError(f"node {self.node} has no devices {sorted(unknown)}")
        now = time.perf_counter()
        t0 = now if epoch_t0 is None else now - (time.time() - epoch_t0)
        self._t_start = t0
        self._unplaced = [failed_end(r, f"model {r.model!r} is not placed on node {self.node}")
                          for r in unplaced]
        for dev, engine in self.engines.items():
            reqs = list(per_device.get(dev, ()))
            self._assigned[dev] = reqs
            self._seen[dev] = len(engine.loop.ended)
            engine.loop.clock = SharedClock(t0)
            t = threading.Thread(target=self._serve_device, args=(dev, reqs),
                                 name=f"node{self.node}-device{dev}", daemon=True)
            self._threads[dev] = t
        for t in self._threads.values():
            t.start()

    def _serve_device(self, dev: int, reqs: List[Request]) -> None:
        try:
            self.engines[dev].run(reqs, realtime=True)
        except BaseException as e:  # noqa: BLE001 - reported for every request it leaves
            self._errors[dev] = f"device {dev} of node {self.node} stopped: {type(e).__name__}: {e}"

    def poll(self) -> List[Ended]:
        """Requests that ended since the last poll (while serving, or after)."""
        out: List[Ended] = []
        for u in self._unplaced:
            if u.output.request_id not in self._reported:
                self._reported.add(u.output.request_id)
                out.append(u)
        for dev, engine in self.engines.items():
            if dev not in self._seen:
                continue
            ended = engine.loop.ended
            n = len(ended)
            for s in ended[self._seen[dev]:n]:
                out.append(Ended(dev, engine.output(s), s.to_record(self._preset(engine, s.model))))
                self._reported.add(s.request_id)
            self._seen[dev] = n
        for dev, t in self._threads.items():  # a dead thread's remaining requests fail
            if not t.is_alive() and dev in self._errors:
                for r in self._assigned[dev]:
                    if r.request_id not in self._reported:
                        self._reported.add(r.request_id)
                        out.append(failed_end(r, self._errors[dev], dev))
        return out

    @staticmethod
    def _preset(engine: Engine, model: str) -> Optional[str]:
        m = engine.models.get(model)
        return m.preset.name if m is not None else None

    @property
    def num_assigned(self) -> int:
        """Requests given to the engines by the last `start`."""
        return sum(len(v) for v in self._assigned.values())

    @property
    def done(self) -> bool:
        return bool(self._threads) and not any(t.is_alive() for t in self._threads.values())

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for every engine to finish its share; True when all did."""
        end = None if timeout is None else time.perf_counter() + timeout
        for t in self._threads.values():
            t.join(None if end is None else max(0.0, end - time.perf_counter()))
        if self.done and self._t_end is None:
            self._t_end = time.perf_counter()
        return self.done

    def serve(self, requests: Sequence[Request]) -> "NodeResult":
        """Route, serve to the end, and collect (a whole node from one call)."""
        requests = assign_ids(requests)
        per, unplaced = self.route(requests)
        self.start(per, unplaced)
        self.wait()
        ended = self.poll()
        return self.result(ended, len(requests))

    # -- results ----------------------------------------------------------------------------
    def result(self, ended: Sequence[Ended], num_requests: int) -> "NodeResult":
        if not self.done:
            raise RuntimeError("the node is still serving")
        if self._t_end is None:
            self._t_end = time.perf_counter()
        return NodeResult(self, list(ended), num_requests, self._t_end - self._t_start,
                          compile_count() - self._c_ready)

    def device_section(self, d: DevicePlan, records: Sequence[RequestRecord]) -> Dict[str, Any]:
        """One device group's section: its plan, tensor parallelism, KV, compile, start-up,
        step statistics and the metrics of the requests it served (`records`)."""
        e = self.engines[d.id]
        tp = e.tp
        per_gpu_arena = e.num_slabs * e.slab_bytes
        kv = metrics.kv_summary(e.kv_samples, arena_bytes=per_gpu_arena, slab_bytes=e.slab_bytes)
        kv.update(num_slabs=e.num_slabs, preemptions=e.scheduler.num_preemptions,
                  compaction=dict(e.compaction_stats), arena_bytes_per_gpu=per_gpu_arena,
                  arena_bytes_all_gpus=per_gpu_arena * tp)
        models = {}
        for n, m in e.models.items():
            split, fmt, r = e.kv_splits[n], e.formats[n], e.runners[n]
            b = device_bytes(r.layouts, tp)
            models[n] = {"config": m.config.name, "preset": m.preset.name,
                         "kv_heads": split.num_kv_heads, "kv_heads_per_gpu": split.local_heads,
                         "kv_replication": split.replication,
                         "block_bytes_per_gpu": fmt.block_bytes,
                         "block_bytes_all_gpus": fmt.block_bytes * tp,
                         "param_bytes": b.param_bytes_total,
                         "param_bytes_per_gpu": b.param_bytes_per_device}
        block = metrics.summarize(records, duration_s=self._t_end - self._t_start)
        return {"device": d.id, "node": self.node, "gpus": list(d.gpus), "tp": tp,
                "jax_devices": [str(x) for x in (e.group.devices if e.group else [])],
                "models": models, "requests": block["overall"]["requests"],
                "overall": block["overall"], "kv": kv,
                "compile": {"warmup_compiles": e.warmup_compiles, "warmup_s": e.warmup_s},
                "startup": dict(e.startup), "steps": e.num_steps,
                "busy_s": e.loop.stats.busy_s,
                "prefix_cache": e.scheduler.prefix_cache_stats(),
                "error": self._errors.get(d.id)}


@dataclasses.dataclass
class NodeResult:
    server: NodeServer
    ended: List[Ended]
    num_requests: int
    wall_s: float  # from the start of serving to the last engine's end
    steady_state_compiles: int  # backend compiles while serving (all engines)

    @property
    def outputs(self) -> Dict[int, RequestOutput]:
        return {e.output.request_id: e.output for e in self.ended}

    @property
    def records(self) -> List[RequestRecord]:
        return sorted((e.record for e in self.ended), key=lambda r: r.request_id)

    @property
    def busy_s(self) -> float:
        return sum(e.loop.stats.busy_s for e in self.server.engines.values())

    @property
    def overlap(self) -> float:
        """Sum of the engines' step times / wall time: above 1, steps of different groups
        ran at the same time."""
        return self.busy_s / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self, config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """The node's summary.json (see `cluster.summary`)."""
        s = self.server
        recs = self.records
        sections = [s.device_section(d, [e.record for e in self.ended if e.device == d.id])
                    for d in s.devices]
        series = [(e.kv_samples, e.tp) for e in s.engines.values()]
        last = max((r.finish_s or r.arrival_s for r in recs), default=0.0)
        out = summary_lib.merged_summary(
            recs, duration_s=max(self.wall_s, last), kv_samples=summary_lib.merge_kv_samples(series),
            kv_arena_bytes=sum(sec["kv"]["arena_bytes_all_gpus"] for sec in sections),
            slab_bytes=[e.slab_bytes for e in s.engines.values()],
            presets=s.scope.model_presets(), models=s.scope.model_names,
            slos=s.scope.model_slos(), sections=sections,
            prefix_cache=summary_lib.sum_counts(sec["prefix_cache"] for sec in sections),
            compile_info={"warmup_compiles": s.warmup_compiles,
                          "steady_state_compiles": self.steady_state_compiles,
                          "warmup_s": sum(e.warmup_s for e in s.engines.values())},
            config=dict(config or {}), section_key="devices")
        out["node"] = {"node": s.node, "devices": len(s.devices),
                       "prefix_cache_counts": summary_lib.sum_counts(
                           sec["prefix_cache"] for sec in sections),
                       "gpus": sum(d.tp for d in s.devices), "startup_s": s.startup_s,
                       "wall_s": self.wall_s, "busy_s": self.busy_s, "overlap": self.overlap,
                       "num_requests": self.num_requests, "ended": len(self.ended)}
        return out

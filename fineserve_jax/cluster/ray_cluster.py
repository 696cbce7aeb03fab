"""A placement plan served across nodes on Ray (the `cluster` extra): one actor per node.

Each actor is a `NodeServer` in a process of its own, created with the node's resources: its
GPUs where the Ray cluster has GPUs, else one CPU and `cpu_devices_per_node` virtual CPU
devices standing in for them (the actor's process gets `XLA_FLAGS` with that device count
through its Ray runtime environment, so JAX sees it when the actor first imports it; the
driver's own JAX, if any, is untouched). The driver routes every request with the router the
simulator uses (`cluster.routing`) over the whole plan, sends each node its devices' shares,
polls the nodes for ended requests, and writes the single-device summary.json schema for the
cluster with a section per node.

Every request ends exactly once: reported by its node, failed because its model is not placed,
or failed with the reason when its node's actor dies (or the run times out) before reporting
it. Nothing is lost silently.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from fineserve_jax.cluster import summary as summary_lib
from fineserve_jax.cluster.routing import route_requests
from fineserve_jax.cluster.topology import plan_nodes
from fineserve_jax.scheduler.plan import PlacementPlan

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("serving on Ray needs the `cluster` extra: pip install "
                          "'fineserve_jax[cluster]' (ray[default])") from e
    return ray


class NodeActor:
    """The body of one node's actor (wrapped by `ray.remote` in `RayCluster`)."""

    def __init__(self, plan: Dict[str, Any], node: int, options: Mapping[str, Any]):
        from fineserve_jax.cluster.node import NodeServer  # JAX starts here, in the actor

        self.node = node
        self.server = NodeServer(PlacementPlan.from_dict(plan), node, **dict(options))
        self.ended: List[Any] = []

    def info(self) -> Dict[str, Any]:
        import jax

        return {"node": self.node, "pid": os.getpid(), "startup_s": self.server.startup_s,
                "warmup_compiles": self.server.warmup_compiles,
                "jax_devices": [str(d) for d in jax.devices()],
                "xla_flags": os.environ.get("XLA_FLAGS", "")}

    def start(self, per_device, unplaced, epoch_t0: float) -> None:
        self.ended = []
        self.server.start(per_device, unplaced, epoch_t0)

    def poll(self):
        """(requests ended since the last poll, whether the node is done)."""
        new = self.server.poll()
        self.ended.extend(new)
        done = self.server.done
        if done:  # the last ones, ended between the poll and the check
            more = self.server.poll()
            self.ended.extend(more)
            new += more
        return new, done

    def summary(self, config: Mapping[str, Any]):
        """(the node's summary, its KV samples in physical bytes on the shared timeline)."""
        self.server.wait()
        res = self.server.result(self.ended, self.server.num_assigned)
        s = res.summary(config)
        kv = summary_lib.merge_kv_samples([(e.kv_samples, e.tp)
                                           for e in self.server.engines.values()])
        return s, kv


@dataclasses.dataclass
class ClusterResult:
    outputs: Dict[int, Any]  # request id -> RequestOutput
    records: List[Any]
    summary: Dict[str, Any]
    dead_nodes: Dict[int, str]


class RayCluster:
    """Node actors for every node of `plan` that holds a device.

    node_options: `NodeServer` keyword options (engine_kwargs, arena_bytes_per_gpu, dtype,
    seed). cpu_devices_per_node: the virtual CPU devices each actor gets when the Ray cluster
    has no GPUs (None: the plan's GPUs per node). address: a running Ray cluster (None: start a
    local one with `ray.init()` unless Ray is already initialized).
    """

    def __init__(self, plan: PlacementPlan, *, node_options: Optional[Mapping[str, Any]] = None,
                 cpu_devices_per_node: Optional[int] = None, address: Optional[str] = None,
                 cost=None, ray_init_kwargs: Optional[Mapping[str, Any]] = None):
        ray = self.ray = import_ray()
        self.plan = plan
        self.nodes = plan_nodes(plan)
        if cost is None:
            from fineserve_jax.scheduler.cost import load_cost_model
            cost = load_cost_model()
        self.cost = cost
        if not ray.is_initialized():
            ray.init(address=address, **dict(ray_init_kwargs or {}))
        gpus = ray.cluster_resources().get("GPU", 0)
        gpn = plan.cluster.gpus_per_node
        self.resources: Dict[int, Dict[str, Any]] = {}
        self.actors: Dict[int, Any] = {}
        remote = ray.remote(NodeActor)
        for k in self.nodes:
            if gpus:
                opts: Dict[str, Any] = {"num_gpus": gpn, "num_cpus": 1}
            else:
                n = cpu_devices_per_node or gpn
                flags = os.environ.get("XLA_FLAGS", "")
                env = {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip(),
                       "PYTHONPATH": os.pathsep.join(
                           p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
                opts = {"num_cpus": 1, "runtime_env": {"env_vars": env}}
            self.resources[k] = {key: v for key, v in opts.items() if key != "runtime_env"}
            self.actors[k] = remote.options(name=None, max_restarts=0, **opts).remote(
                plan.to_dict(), k, dict(node_options or {}))
        self.dead: Dict[int, str] = {}
        self.info: Dict[int, Dict[str, Any]] = {}

    def wait_ready(self, timeout_s: Optional[float] = None) -> Dict[int, Dict[str, Any]]:
        """Wait until every node has loaded and compiled its models; a node that dies while
        starting is recorded as dead (its requests will fail with the reason)."""
        for k, a in self.actors.items():
            try:
                self.info[k] = self.ray.get(a.info.remote(), timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - a node that cannot start is a dead node
                self.dead[k] = f"node {k} failed to start: {type(e).__name__}: {e}"
        return self.info

    def _node_of_device(self) -> Dict[int, int]:
        return {d.id: k for k, devs in self.nodes.items() for d in devs}

    def serve(self, requests: Sequence, *, config: Optional[Mapping[str, Any]] = None,
              poll_s: float = 0.2, timeout_s: Optional[float] = None,
              start_delay_s: float = 0.5, on_poll=None) -> ClusterResult:
        """Route `requests` (arrival times in seconds after the start) over the plan, serve
        them on the nodes, and gather every outcome. `on_poll(cluster, outputs)` (request id ->
        `RequestOutput` so far) is called after each polling round (tests kill a node from
        it)."""
        from fineserve_jax.cluster.node import assign_ids, failed_end

        ray = self.ray
        if not self.info:
            self.wait_ready()
        requests = assign_ids(requests)
        by_id = {r.request_id: r for r in requests}
        per_dev, unplaced = route_requests(requests, self.plan, self.cost)
        where = self._node_of_device()
        pending: Dict[int, set] = {k: set() for k in self.actors}
        shares: Dict[int, Dict[int, list]] = {k: {} for k in self.actors}
        for dev, its in per_dev.items():
            k = where[dev]
            shares[k][dev] = list(its)
            pending[k].update(r.request_id for r in its)
        records, outputs = [], {}

        def fail(ids, reason):
            for i in sorted(ids):
                e = failed_end(by_id[i], reason)
                records.append(e.record)
                outputs[i] = e.output

        fail([r.request_id for r in unplaced], "model is not placed on any node of the plan")
        for k, reason in self.dead.items():
            fail(pending.pop(k), reason)
        epoch = time.time() + start_delay_s  # every node on one timeline
        t_end = None if timeout_s is None else time.perf_counter() + start_delay_s + timeout_s
        for k in list(pending):
            try:
                ray.get(self.actors[k].start.remote(shares[k], [], epoch))
            except Exception as e:  # noqa: BLE001
                self.dead[k] = f"node {k} died: {type(e).__name__}: {e}"
                fail(pending.pop(k), self.dead[k])
        done: Dict[int, bool] = {}
        while any(not done.get(k) for k in pending):
            for k in [k for k in pending if not done.get(k)]:
                try:
                    new, finished = ray.get(self.actors[k].poll.remote())
                except Exception as e:  # noqa: BLE001 - RayActorError and its kin
                    self.dead[k] = f"node {k} died: {type(e).__name__}: {e}"
                    fail(pending.pop(k), self.dead[k])
                    continue
                for e in new:
                    records.append(e.record)
                    outputs[e.output.request_id] = e.output
                    pending[k].discard(e.output.request_id)
                done[k] = finished
            if on_poll is not None:
                on_poll(self, outputs)
            if t_end is not None and time.perf_counter() > t_end:
                for k in [k for k in pending if not done.get(k)]:
                    self.dead[k] = f"node {k} did not finish within {timeout_s} s"
                    fail(pending.pop(k), self.dead[k])
                break
            if any(not done.get(k) for k in pending):
                time.sleep(poll_s)
        for k in list(pending):  # finished nodes: anything they never reported fails
            if pending[k]:
                fail(pending[k], f"node {k} finished without reporting these requests")
        wall = time.time() - epoch
        summary = self._summary(records, pending, wall, dict(config or {}))
        return ClusterResult(outputs, sorted(records, key=lambda r: r.request_id), summary,
                             dict(self.dead))

    def _summary(self, records, alive, wall_s: float, config) -> Dict[str, Any]:
        sections, series = [], []
        for k in self.actors:
            if k in alive and k not in self.dead:
                try:
                    s, kv = self.ray.get(self.actors[k].summary.remote(config))
                    sections.append(s)
                    series.append((kv, 1))
                    continue
                except Exception as e:  # noqa: BLE001
                    self.dead[k] = f"node {k} died: {type(e).__name__}: {e}"
            sections.append({"node": {"node": k, "status": "died", "error": self.dead.get(k)},
                             "kv": {}, "compile": {}})
        plan = self.plan
        last = max((r.finish_s or r.arrival_s for r in records), default=0.0)
        compiles = [s["compile"] for s in sections if s["compile"]]
        return summary_lib.merged_summary(
            records, duration_s=max(wall_s, last), kv_samples=summary_lib.merge_kv_samples(series),
            kv_arena_bytes=sum(s["kv"].get("arena_bytes") or 0 for s in sections),
            slab_bytes=[s["kv"]["slab_bytes"] for s in sections if s["kv"].get("slab_bytes")],
            presets=plan.model_presets(), models=plan.model_names, slos=plan.model_slos(),
            sections=sections,
            prefix_cache=summary_lib.sum_counts(s["node"].get("prefix_cache_counts")
                                                for s in sections),
            compile_info={
                "warmup_compiles": sum(c["warmup_compiles"] for c in compiles),
                # None when a node died: its count is unknown, not zero.
                "steady_state_compiles": (None if self.dead else
                                          sum(c["steady_state_compiles"] for c in compiles)),
                "warmup_s": sum(c["warmup_s"] for c in compiles)},
            config={**config, "nodes": {str(k): self.resources[k] for k in self.actors},
                    "dead_nodes": {str(k): v for k, v in self.dead.items()}},
            section_key="nodes")

    def shutdown(self) -> None:
        for a in self.actors.values():
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass


"""The placement plan: which models run on which GPUs, and the file format the simulator and
the engine launcher read. Pure Python (no JAX).

A *device* is one tensor-parallel group of GPUs inside one node (tp = number of GPUs); every
model on a device runs with that tp and the device's models share its GPUs in time and its KV
arena. Devices never share GPUs. A model may appear on several devices (replicas); each copy
carries the request rate routed to it.

File (JSON, `PlacementPlan.save` / `load`):

    {"version": 1, "policy": "fineserve", "max_model_len": 4096, "tokens_per_block": 16,
     "cluster": {"nodes": 1, "gpus_per_node": 8, "gpu_memory_bytes": 85899345920,
                 "memory_utilization": 0.9, "gpu": "H100-80GB"},
     "devices": [{"id": 0, "gpus": [0, 1], "kv_arena_bytes": ...,
                  "models": [{"name": "llm-1", "config": "llama-13b", "preset": "org",
                              "rate": 4.1, "slo_ttft_s": 1.5, "weight_bytes": ...,
                              "min_kv_bytes": ..., "kv_partition_bytes": ...}]}],
     "estimates": {...}}

Memory rule (checked by `check_plan`): on every device,
    sum(weight_bytes) + sum(min_kv_bytes) <= tp x usable bytes per GPU
    sum(min_kv_bytes) <= kv_arena_bytes <= tp x usable - sum(weight_bytes)
where usable = gpu_memory_bytes x memory_utilization (the rest is activations, workspace and
the CUDA context, like vLLM's gpu_memory_utilization). Sums are the TP group's bytes
(`footprint.footprint(..., tp)`: weights and KV heads sharded evenly, KV heads replicated when
the group has more GPUs than the model has KV heads, and those copies counted), so this is the
per-GPU rule multiplied by tp. A model whose heads do not split over its device's tp is an
error.
`kv_partition_bytes` is the per-model split a static-partition system would use (baselines);
with the KV slab the models share the whole arena.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from fineserve_jax.scheduler.footprint import GiB, footprint

PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan that breaks the memory rule or is malformed; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """nodes x gpus_per_node identical GPUs of `gpu_memory_bytes` each."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_bytes: int = 80 * GiB
    memory_utilization: float = 0.9  # share of a GPU for weights + KV (the rest: activations)
    gpu: str = "H100-80GB"

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"cluster shape must be positive, got {self.nodes} x {self.gpus_per_node}")
        if self.gpu_memory_bytes <= 0:
            raise ValueError(f"gpu_memory_bytes must be positive, got {self.gpu_memory_bytes}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes_per_gpu(self) -> int:
        return int(self.gpu_memory_bytes * self.memory_utilization)

    def node_of(self, gpu: int) -> int:
        return gpu // self.gpus_per_node

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClusterSpec":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass(frozen=True)
class PlacedModel:
    """One model's copy on one device. Bytes are whole-model (over the device's TP group)."""

    name: str  # the served name requests address
    config: str  # models/presets.py config name
    preset: str  # precision preset
    rate: float  # requests/s routed to this copy
    slo_ttft_s: Optional[float]
    weight_bytes: int
    min_kv_bytes: int
    kv_partition_bytes: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PlacedModel":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """One tensor-parallel group (GPU ranks are global: node * gpus_per_node + local)."""

    id: int
    gpus: Tuple[int, ...]
    models: Tuple[PlacedModel, ...]
    kv_arena_bytes: int

    @property
    def tp(self) -> int:
        return len(self.gpus)

    @property
    def weight_bytes(self) -> int:
        return sum(m.weight_bytes for m in self.models)

    @property
    def min_kv_bytes(self) -> int:
        return sum(m.min_kv_bytes for m in self.models)

    def model(self, name: str) -> PlacedModel:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"model {name!r} is not on device {self.id}")

    def to_dict(self) -> Dict[str, Any]:
        return {"id": self.id, "gpus": list(self.gpus), "kv_arena_bytes": self.kv_arena_bytes,
                "models": [m.to_dict() for m in self.models]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DevicePlan":
        return cls(int(d["id"]), tuple(int(g) for g in d["gpus"]),
                   tuple(PlacedModel.from_dict(m) for m in d["models"]), int(d["kv_arena_bytes"]))


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    cluster: ClusterSpec
    devices: Tuple[DevicePlan, ...]
    policy: str
    max_model_len: int = 4096
    tokens_per_block: int = 16
    estimates: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # informational

    # -- views --
    def instances(self) -> Dict[str, List[Tuple[DevicePlan, PlacedModel]]]:
        """model name -> its (device, copy) pairs, in device order."""
        out: Dict[str, List[Tuple[DevicePlan, PlacedModel]]] = {}
        for d in self.devices:
            for m in d.models:
                out.setdefault(m.name, []).append((d, m))
        return out

    @property
    def model_names(self) -> List[str]:
        return list(self.instances())

    def model_rates(self) -> Dict[str, float]:
        return {n: sum(m.rate for _, m in v) for n, v in self.instances().items()}

    def model_slos(self) -> Dict[str, Optional[float]]:
        return {n: v[0][1].slo_ttft_s for n, v in self.instances().items()}

    def model_presets(self) -> Dict[str, str]:
        return {n: v[0][1].preset for n, v in self.instances().items()}

    @property
    def gpus_used(self) -> int:
        return sum(d.tp for d in self.devices)

    # -- file format --
    def to_dict(self) -> Dict[str, Any]:
        return {"version": PLAN_VERSION, "policy": self.policy, "max_model_len": self.max_model_len,
                "tokens_per_block": self.tokens_per_block, "cluster": self.cluster.to_dict(),
                "devices": [d.to_dict() for d in self.devices], "estimates": dict(self.estimates)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PlacementPlan":
        v = d.get("version")
        if v != PLAN_VERSION:
            raise PlanError(f"unsupported plan version {v!r} (this code reads version {PLAN_VERSION})")
        try:
            return cls(ClusterSpec.from_dict(d["cluster"]),
                       tuple(DevicePlan.from_dict(x) for x in d["devices"]), str(d["policy"]),
                       int(d.get("max_model_len", 4096)), int(d.get("tokens_per_block", 16)),
                       dict(d.get("estimates") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed placement plan: {type(e).__name__}: {e}") from None

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], check: bool = True) -> "PlacementPlan":
        with open(path) as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as e:
                raise PlanError(f"{os.fspath(path)}: not JSON: {e}") from None
        plan = cls.from_dict(doc)
        if check:
            check_plan(plan)
        return plan

    def describe(self) -> str:
        """A human-readable table: one line per device."""
        gib = 1.0 / GiB
        lines = [f"placement {self.policy!r}: {len(self.devices)} devices on {self.gpus_used} of "
                 f"{self.cluster.num_gpus} GPUs ({self.cluster.nodes} x {self.cluster.gpus_per_node} "
                 f"x {self.cluster.gpu_memory_bytes * gib:.0f} GiB)"]
        per = self.estimates.get("devices", {})
        for d in self.devices:
            est = per.get(str(d.id), {})
            load = f" load {est['load']:.2f}" if est.get("load") is not None else ""
            models = ", ".join(f"{m.name}[{m.config}/{m.preset} {m.rate:.2f}/s]" for m in d.models)
            lines.append(f"  dev {d.id:>2} gpus {','.join(map(str, d.gpus)):<15} tp{d.tp} "
                         f"weights {d.weight_bytes * gib:6.1f} GiB KV {d.kv_arena_bytes * gib:6.1f} GiB"
                         f"{load}: {models}")
        return "\n".join(lines)


def device_capacity_bytes(cluster: ClusterSpec, tp: int) -> int:
    """Weights + KV bytes a device of `tp` GPUs may hold."""
    return tp * cluster.usable_bytes_per_gpu


def check_plan(plan: PlacementPlan, *, check_footprints: bool = True) -> None:
    """Raise PlanError listing every violation of the memory rule and of the plan's structure.

    check_footprints: recompute each model's weight and minimum-KV bytes from its config and
    preset and refuse a plan that under-states them (a hand-edited plan cannot lie its way
    past the memory rule).
    """
    c = plan.cluster
    problems: List[str] = []
    seen_gpus: Dict[int, int] = {}
    seen_ids = set()
    defs: Dict[str, Tuple[str, str, Optional[float]]] = {}
    for d in plan.devices:
        where = f"device {d.id}"
        if d.id in seen_ids:
            problems.append(f"{where}: duplicate device id")
        seen_ids.add(d.id)
        if not d.gpus:
            problems.append(f"{where}: no GPUs")
            continue
        for g in d.gpus:
            if not 0 <= g < c.num_gpus:
                problems.append(f"{where}: GPU {g} is outside the cluster (0..{c.num_gpus - 1})")
            elif g in seen_gpus:
                problems.append(f"{where}: GPU {g} is already used by device {seen_gpus[g]}")
            else:
                seen_gpus[g] = d.id
        if len({c.node_of(g) for g in d.gpus}) > 1:
            problems.append(f"{where}: GPUs {list(d.gpus)} span nodes (a TP group stays in one node)")
        if not d.models:
            problems.append(f"{where}: no models")
        names = [m.name for m in d.models]
        if len(set(names)) != len(names):
            problems.append(f"{where}: a model appears twice: {names}")
        for m in d.models:
            key = (m.config, m.preset, m.slo_ttft_s)
            if defs.setdefault(m.name, key) != key:
                problems.append(f"model {m.name!r}: config/preset/SLO differ between its copies")
            if not m.rate >= 0:
                problems.append(f"{where}: model {m.name!r} has rate {m.rate!r}")
            if check_footprints:
                try:
                    fp = footprint(m.config, m.preset, plan.tokens_per_block, d.tp)
                except ValueError as e:
                    problems.append(f"{where}: model {m.name!r}: {e}")
                    continue
                need_kv = fp.min_kv_bytes(plan.max_model_len)
                if m.weight_bytes < fp.weight_bytes:
                    problems.append(f"{where}: model {m.name!r} declares {m.weight_bytes} weight bytes, "
                                    f"but {m.config}/{m.preset} needs {fp.weight_bytes}")
                if m.min_kv_bytes < need_kv:
                    problems.append(f"{where}: model {m.name!r} declares min KV {m.min_kv_bytes} B, "
                                    f"but one {fp.max_len(plan.max_model_len)}-token sequence needs {need_kv}")
            if m.kv_partition_bytes is not None and m.kv_partition_bytes < m.min_kv_bytes:
                problems.append(f"{where}: model {m.name!r}: KV partition {m.kv_partition_bytes} B is "
                                f"below its minimum {m.min_kv_bytes} B")
        cap = device_capacity_bytes(c, d.tp)
        need = d.weight_bytes + d.min_kv_bytes
        if need > cap:
            problems.append(
                f"{where} (tp{d.tp}): weights {d.weight_bytes / GiB:.2f} GiB + minimum KV "
                f"{d.min_kv_bytes / GiB:.2f} GiB = {need / GiB:.2f} GiB exceed "
                f"{cap / GiB:.2f} GiB ({d.tp} x {c.usable_bytes_per_gpu / GiB:.2f} GiB usable)")
        if d.kv_arena_bytes > cap - d.weight_bytes:
            problems.append(f"{where}: KV arena {d.kv_arena_bytes / GiB:.2f} GiB exceeds the "
                            f"{(cap - d.weight_bytes) / GiB:.2f} GiB left after weights")
        if d.kv_arena_bytes < d.min_kv_bytes:
            problems.append(f"{where}: KV arena {d.kv_arena_bytes / GiB:.2f} GiB is below the "
                            f"models' minimum {d.min_kv_bytes / GiB:.2f} GiB")
        parts = [m.kv_partition_bytes for m in d.models if m.kv_partition_bytes is not None]
        if parts and sum(parts) > d.kv_arena_bytes:
            problems.append(f"{where}: static KV partitions sum to {sum(parts)} B > arena {d.kv_arena_bytes} B")
    if problems:
        raise PlanError("invalid placement plan: " + "; ".join(problems))


def make_device(id: int, gpus: Sequence[int], models: Sequence[PlacedModel], cluster: ClusterSpec,
                kv_arena_bytes: Optional[int] = None) -> DevicePlan:
    """A device whose KV arena is everything its GPUs have left after the weights (default)."""
    gpus = tuple(int(g) for g in gpus)
    models = tuple(models)
    if kv_arena_bytes is None:
        kv_arena_bytes = device_capacity_bytes(cluster, len(gpus)) - sum(m.weight_bytes for m in models)
    return DevicePlan(int(id), gpus, models, int(kv_arena_bytes))

"""Global placement: assign models (config, precision preset, request rate, TTFT SLO) to
tensor-parallel groups ("devices") of a cluster. Pure Python (no JAX).

Common steps, for every policy:
  1. base tp of a model: the smallest tp (1, 2, 4, 8, within one node) at which its weights
     plus its minimum KV (one longest sequence) fit (`plan.check_plan`'s memory rule). None
     fits: PlacementError naming the model.
  2. SLO: the model's own, else FineServe's default `slo_scale` x TTFT(903-token prompt) + 4 ms
     at the base tp (`CostModel.default_slo_ttft`).
  3. copies (replicas): for each tp from the base tp up, the copies needed so that one copy
     alone stays below `target_load` (the load of `load_estimate`); the (tp, copies) needing
     the fewest GPUs wins (then fewer copies, then smaller tp). Each copy takes rate / copies
     and needs a device of at least that tp.
  4. the copies are placed (per policy, below): a greedy pass over every candidate partition
     of the nodes into TP groups (all power-of-two splits, like MuxServe's mesh enumeration;
     capped at `max_partitions`), then, on the `refine_partitions` best, a local search that
     moves single copies while the policy's objective improves. GPUs left over hold extra
     replicas of the most loaded models (the rates of a model's copies are split evenly).

Policies:
  fineserve  (the paper's global scheduler) Places copies in decreasing order of memory
             need (weights + predicted KV), each on the
             memory-feasible device that adds the most *SLO goodput* (output tokens/s of the
             models predicted to meet their TTFT SLO under the device's combined load) and,
             among equals, the one where the copy's *marginal memory efficiency* times the KV
             left over (tokens/s the spare memory could still serve for this precision) is
             largest. The partition with the most predicted goodput wins.
  muxserve   MuxServe's greedy: copies in decreasing rate x weight size, each on the
             memory-feasible device with the largest predicted throughput gain (ties: least
             loaded); the partition with the most predicted throughput wins. No SLO term.
  prism      Prism's KV-pressure balancing: copies in decreasing rate / SLO, each on the
             device minimising KV pressure = sum(rate / SLO) / (KV bytes left after weights);
             the partition with the smallest worst pressure wins.
  spatial    dedicated GPUs: every copy gets its own base-tp group; spare GPUs add replicas.

`replan(plan, models, ...)` re-places for new rates: it keeps the old plan (new rates only)
when every device stays feasible, and otherwise places again and reports what moved.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from fineserve_jax.scheduler.footprint import GiB, Footprint, footprint, tp_fits
from fineserve_jax.scheduler.load_estimate import (
    DeviceEstimate,
    ModelProfile,
    estimate_device,
    profile_model,
    split_partitions,
)
from fineserve_jax.scheduler.plan import (
    ClusterSpec,
    DevicePlan,
    PlacedModel,
    PlacementPlan,
    check_plan,
    device_capacity_bytes,
)

POLICIES = ("fineserve", "muxserve", "prism", "spatial")


class PlacementError(ValueError):
    """No placement exists; `model` names the model that does not fit (None: the fleet)."""

    def __init__(self, message: str, model: Optional[str] = None):
        super().__init__(message)
        self.model = model


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A model to place: `config` names a models/presets.py config; rate in requests/s; mean
    prompt/output lengths in tokens (ShareGPT's by default)."""

    name: str
    config: str
    preset: str = "org"
    rate: float = 1.0
    slo_ttft_s: Optional[float] = None
    prompt_len: float = 161.0
    output_len: float = 338.0

    def __post_init__(self):
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ValueError(f"model {self.name!r}: rate must be finite and >= 0, got {self.rate!r}")
        if self.slo_ttft_s is not None and not self.slo_ttft_s > 0:
            raise ValueError(f"model {self.name!r}: slo_ttft_s must be > 0, got {self.slo_ttft_s!r}")


@dataclasses.dataclass(frozen=True)
class PlacementConfig:
    max_model_len: int = 4096  # longest prompt + output served (min KV = one such sequence)
    tokens_per_block: int = 16
    tp_choices: Tuple[int, ...] = (1, 2, 4, 8)
    slo_scale: float = 40.0  # default SLO = scale x TTFT(903 tokens) + 4 ms (FineServe)
    target_load: float = 0.7  # replicas keep a copy alone below this load
    max_load: float = 0.9  # a device above this load is predicted to miss SLOs
    kv_headroom: float = 2.0  # KV memory must hold this multiple of the mean predicted demand
    max_partitions: int = 300  # cap on enumerated TP-group partitions
    replicate_leftover: bool = True  # fill unused GPUs with replicas
    refine_partitions: int = 3  # best greedy partitions refined by local search
    local_search_rounds: int = 3  # passes of single-copy moves


# --------------------------------------------------------------------------------------
# Per-model facts


@dataclasses.dataclass
class _Copy:
    """One copy (replica) of a model being placed."""

    model: ServedModel
    min_tp: int  # the smallest TP group this copy may run on
    rate: float
    slo: Optional[float]


class _Facts:
    """Footprints, base tp, SLOs and cost-model profiles of the fleet (cached)."""

    def __init__(self, models: Sequence[ServedModel], cluster: ClusterSpec, cost, cfg: PlacementConfig):
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names: {names}")
        if not models:
            raise ValueError("nothing to place: no models")
        self.models = {m.name: m for m in models}
        self.cluster, self.cost, self.cfg = cluster, cost, cfg
        # TP sizes each model may run with: in `tp_choices`, within a node, splitting its heads
        # (`formats.kv_split`); asked by every `can_take` of the search, so computed once
        self.tps = {m.name: sorted(t for t in cfg.tp_choices if t <= cluster.gpus_per_node
                                   and tp_fits(m.config, t)) for m in models}
        self.base_tp = {m.name: self._base_tp(m) for m in models}
        self.slo = {m.name: (m.slo_ttft_s if m.slo_ttft_s is not None else
                             cost.default_slo_ttft(m.config, m.preset, self.base_tp[m.name],
                                                   scale=cfg.slo_scale))
                    for m in models}
        self._prof: Dict[Tuple[str, int], ModelProfile] = {}

    def fp(self, name: str, tp: int) -> Footprint:
        """The model's footprint on a group of `tp` GPUs (replicated KV heads counted)."""
        m = self.models[name]
        return footprint(m.config, m.preset, self.cfg.tokens_per_block, tp)

    def min_kv(self, name: str, tp: int) -> int:
        return self.fp(name, tp).min_kv_bytes(self.cfg.max_model_len)

    def need(self, name: str, tp: int) -> int:
        """Weights + minimum KV bytes of the model on a group of `tp` GPUs."""
        return self.fp(name, tp).weight_bytes + self.min_kv(name, tp)

    def _base_tp(self, m: ServedModel) -> int:
        tps = self.tps[m.name]
        if not tps:
            raise PlacementError(
                f"model {m.name!r} ({m.config}) cannot run with any TP size in "
                f"{tuple(self.cfg.tp_choices)} within {self.cluster.gpus_per_node}-GPU nodes: "
                f"its heads do not split over them", m.name)
        for t in tps:
            if self.need(m.name, t) <= device_capacity_bytes(self.cluster, t):
                return t
        biggest = tps[-1]
        fp = self.fp(m.name, biggest)
        raise PlacementError(
            f"model {m.name!r} ({m.config}/{m.preset}) does not fit: weights "
            f"{fp.weight_bytes / GiB:.1f} GiB + minimum KV {self.min_kv(m.name, biggest) / GiB:.2f} GiB "
            f"(one {fp.max_len(self.cfg.max_model_len)}-token sequence) = "
            f"{self.need(m.name, biggest) / GiB:.1f} GiB "
            f"> {device_capacity_bytes(self.cluster, biggest) / GiB:.1f} GiB usable on the largest TP group "
            f"({biggest} x {self.cluster.usable_bytes_per_gpu / GiB:.1f} GiB)", m.name)

    def profile(self, name: str, tp: int, rate: float) -> ModelProfile:
        p = self._prof.get((name, tp))
        if p is None:
            m = self.models[name]
            p = profile_model(self.cost, name, m.config, m.preset, tp, m.rate, m.prompt_len,
                              m.output_len, self.slo[name], self.fp(name, tp).kv_bytes_per_token,
                              self.fp(name, tp).weight_bytes, self.min_kv(name, tp))
            self._prof[(name, tp)] = p
        return p if p.rate == rate else p.with_rate(rate)

    def copies(self) -> List[_Copy]:
        """Step 3: split each model into copies so one copy alone stays below the target load.

        For every tp from the base tp up, dp(tp) = copies needed at that tp; the (tp, dp) that
        needs the fewest GPUs (tp x dp) wins, then the fewest copies (each copy holds all the
        weights again), then the smaller tp. A copy needs a device of at least that tp.
        """
        out = []
        for name, m in self.models.items():
            best, fallback = None, None
            for tp in (t for t in self.tps[name] if t >= self.base_tp[name]):
                work = self.profile(name, tp, m.rate).work_s
                n = max(1, math.ceil(m.rate * work / self.cfg.target_load - 1e-9))
                if tp * n <= self.cluster.num_gpus:
                    key = (tp * n, n, tp)
                    best = key if best is None or key < best else best
                else:  # too hot for the cluster: as many copies as fit, least load per copy
                    cap = max(1, self.cluster.num_gpus // tp)
                    key = (m.rate * work / cap, tp)
                    if fallback is None or key < fallback[0]:
                        fallback = (key, cap, tp)
            n, tp = (best[1], best[2]) if best is not None else fallback[1:]
            out += [_Copy(m, tp, m.rate / n, self.slo[name]) for _ in range(n)]
        return out


# --------------------------------------------------------------------------------------
# Devices under construction


class _Dev:
    def __init__(self, gpus: Tuple[int, ...], cluster: ClusterSpec, facts: _Facts):
        self.gpus, self.tp, self.facts = gpus, len(gpus), facts
        self.capacity = device_capacity_bytes(cluster, self.tp)
        self.copies: List[_Copy] = []
        self.est: Optional[DeviceEstimate] = None

    @property
    def names(self):
        return {c.model.name for c in self.copies}

    def used_bytes(self, extra: Optional[_Copy] = None) -> int:
        cs = self.copies + ([extra] if extra else [])
        return sum(self.facts.need(c.model.name, self.tp) for c in cs)

    def arena_bytes(self, extra: Optional[_Copy] = None) -> int:
        cs = self.copies + ([extra] if extra else [])
        return self.capacity - sum(self.facts.fp(c.model.name, self.tp).weight_bytes for c in cs)

    def can_take(self, c: _Copy) -> bool:
        return (self.tp >= c.min_tp and c.model.name not in self.names
                and self.tp in self.facts.tps[c.model.name]
                and self.used_bytes(c) <= self.capacity)

    def profiles(self, extra: Optional[_Copy] = None) -> List[ModelProfile]:
        cs = self.copies + ([extra] if extra else [])
        return [self.facts.profile(c.model.name, self.tp, c.rate) for c in cs]

    def estimate(self, extra: Optional[_Copy] = None) -> DeviceEstimate:
        if extra is None and self.est is not None:
            return self.est
        cfg = self.facts.cfg
        e = estimate_device(self.profiles(extra), self.arena_bytes(extra), max_load=cfg.max_load,
                            kv_headroom=cfg.kv_headroom)
        if extra is None:
            self.est = e
        return e

    def add(self, c: _Copy) -> None:
        self.copies.append(c)
        self.est = None

    def kv_pressure_prism(self, extra: Optional[_Copy] = None) -> float:
        cs = self.copies + ([extra] if extra else [])
        free = self.arena_bytes(extra)
        w = sum(c.rate / c.slo for c in cs if c.slo)
        return w / free if free > 0 else math.inf


# --------------------------------------------------------------------------------------
# Policies: order of copies, device score (larger is better), partition objective


def _order_fineserve(c: _Copy, f: _Facts) -> float:
    p = f.profile(c.model.name, c.min_tp, c.rate)
    est = estimate_device([p], device_capacity_bytes(f.cluster, c.min_tp) - p.weight_bytes)
    return p.weight_bytes + sum(v for v in est.kv_demand_bytes.values() if math.isfinite(v))


def _score_fineserve(d: _Dev, c: _Copy) -> tuple:
    before, after = d.estimate(), d.estimate(c)
    gain = after.goodput_tokens_per_s - before.goodput_tokens_per_s
    spare = after.kv_arena_bytes - sum(v for v in after.kv_demand_bytes.values() if math.isfinite(v))
    return (round(gain, 3), after.mme[c.model.name] * max(spare, 0.0), -after.load)


def _score_muxserve(d: _Dev, c: _Copy) -> tuple:
    before, after = d.estimate(), d.estimate(c)
    return (round(after.tokens_per_s - before.tokens_per_s, 3), -after.load)


def _score_prism(d: _Dev, c: _Copy) -> tuple:
    return (-d.kv_pressure_prism(c),)


def _objective(policy: str, devs: List[_Dev]) -> tuple:
    ests = [d.estimate() for d in devs if d.copies]
    good = sum(e.goodput_tokens_per_s for e in ests)
    tokens = sum(e.tokens_per_s for e in ests)
    max_load = max((e.load for e in ests), default=0.0)
    mean_load = sum(e.load for e in ests) / len(ests) if ests else 0.0
    if policy == "fineserve":
        return (round(good, 3), round(tokens, 3), -round(max_load, 6), -mean_load)
    if policy == "muxserve":
        return (round(tokens, 3), -round(max_load, 6), -mean_load)
    worst = max((d.kv_pressure_prism() for d in devs if d.copies), default=0.0)
    return (-worst, round(tokens, 3), -mean_load)


_POLICY: Dict[str, Tuple[Callable, Callable]] = {
    "fineserve": (lambda c, f: -_order_fineserve(c, f), _score_fineserve),
    "muxserve": (lambda c, f: -c.rate * f.fp(c.model.name, c.min_tp).weight_bytes, _score_muxserve),
    "prism": (lambda c, f: -(c.rate / c.slo if c.slo else 0.0), _score_prism),
}


# --------------------------------------------------------------------------------------
# TP-group partitions of the cluster


def node_patterns(gpus_per_node: int, sizes: Sequence[int]) -> List[Tuple[int, ...]]:
    """Every multiset of group sizes (from `sizes`) summing to the node's GPUs, largest first."""
    sizes = sorted({s for s in sizes if s <= gpus_per_node}, reverse=True)
    out: List[Tuple[int, ...]] = []

    def rec(left, start, acc):
        if left == 0:
            out.append(tuple(acc))
            return
        for i in range(start, len(sizes)):
            if sizes[i] <= left:
                rec(left - sizes[i], i, acc + [sizes[i]])

    rec(gpus_per_node, 0, [])
    return out


def cluster_partitions(cluster: ClusterSpec, sizes: Sequence[int], limit: int) -> List[List[Tuple[int, ...]]]:
    """Candidate partitions: one pattern per node. All multisets of node patterns when there
    are at most `limit`, else the uniform ones plus two-pattern mixes (k nodes one way, the rest
    another)."""
    pats = node_patterns(cluster.gpus_per_node, sizes)
    n = cluster.nodes
    if math.comb(len(pats) + n - 1, n) <= limit:
        return [list(c) for c in itertools.combinations_with_replacement(pats, n)]
    out = [[p] * n for p in pats]
    for a, b in itertools.combinations(pats, 2):
        for k in range(1, n):
            out.append([a] * k + [b] * (n - k))
    return out[:limit] if len(out) > limit else out


def _devices_for(partition: List[Tuple[int, ...]], cluster: ClusterSpec, facts: _Facts) -> List[_Dev]:
    devs = []
    for node, pattern in enumerate(partition):
        off = node * cluster.gpus_per_node
        for size in pattern:  # largest first, so every group is aligned to its size
            devs.append(_Dev(tuple(range(off, off + size)), cluster, facts))
            off += size
    return devs


# --------------------------------------------------------------------------------------
# Placement


def _greedy(policy: str, copies: List[_Copy], devs: List[_Dev], facts: _Facts) -> Optional[str]:
    """Place copies in the policy's order; returns the name of a copy that did not fit."""
    order, score = _POLICY[policy]
    for c in sorted(copies, key=lambda c: (order(c, facts), c.model.name)):
        cands = [d for d in devs if d.can_take(c)]
        if not cands:
            return c.model.name
        best = max(cands, key=lambda d: score(d, c))
        best.add(c)
    return None


def _improve(policy: str, devs: List[_Dev], rounds: int) -> tuple:
    """Local search after the greedy pass: move single copies between devices (empty ones
    included) while the policy's own objective improves. Returns the final objective."""
    key = _objective(policy, devs)
    for _ in range(rounds):
        improved = False
        for src in devs:
            for c in list(src.copies):
                for dst in devs:
                    if dst is src or not dst.can_take(c):
                        continue
                    src.copies.remove(c)
                    src.est = None
                    dst.add(c)
                    new = _objective(policy, devs)
                    if new > key:
                        key, improved = new, True
                        break
                    dst.copies.remove(c)
                    dst.est = None
                    src.add(c)
        if not improved:
            break
    return key


def _fill_leftover(devs: List[_Dev], facts: _Facts) -> None:
    """Add replicas of the most loaded models onto empty devices (rates re-split evenly)."""
    while True:
        empty = [d for d in devs if not d.copies]
        if not empty:
            return
        # Candidate models, most loaded copy first.
        loads = []
        for d in devs:
            if d.copies:
                e = d.estimate()
                for c in d.copies:
                    loads.append((e.load, c.rate * facts.profile(c.model.name, d.tp, c.rate).work_s, c))
        loads.sort(key=lambda x: (-x[0], -x[1], x[2].model.name))
        placed = False
        for _, _, c in loads:
            name = c.model.name
            targets = [d for d in empty if d.can_take(c)]
            if not targets:
                continue
            target = min(targets, key=lambda d: d.tp)  # the smallest group that holds it
            siblings = [x for d in devs for x in d.copies if x.model.name == name]
            k = len(siblings) + 1
            new = _Copy(c.model, c.min_tp, c.model.rate / k, c.slo)
            for x in siblings:
                x.rate = c.model.rate / k
            for d in devs:
                d.est = None
            target.add(new)
            placed = True
            break
        if not placed:
            return


def _aligned_slots(cluster: ClusterSpec):
    """Buddy-style free slots per node: allocate(size) -> GPU ranks, or None."""
    free = [[True] * cluster.gpus_per_node for _ in range(cluster.nodes)]

    def allocate(size: int):
        for node in range(cluster.nodes):
            for off in range(0, cluster.gpus_per_node - size + 1, size):
                if all(free[node][off:off + size]):
                    for g in range(off, off + size):
                        free[node][g] = False
                    base = node * cluster.gpus_per_node
                    return tuple(range(base + off, base + off + size))
        return None

    return allocate


def _spatial(copies: List[_Copy], facts: _Facts, cluster: ClusterSpec) -> List[_Dev]:
    # Too many GPUs wanted: drop replicas of the most replicated models first.
    by_model: Dict[str, List[_Copy]] = {}
    for c in copies:
        by_model.setdefault(c.model.name, []).append(c)
    # Then shrink TP groups chosen above a model's base tp (slower, but it fits).
    while sum(c.min_tp for v in by_model.values() for c in v) > cluster.num_gpus:
        name = max((n for n, v in by_model.items() if len(v) > 1),
                   key=lambda n: (len(by_model[n]), n), default=None)
        if name is not None:
            v = by_model[name]
            v.pop()
            for c in v:
                c.rate = c.model.rate / len(v)
            continue
        wide = [c for v in by_model.values() for c in v if c.min_tp > facts.base_tp[c.model.name]]
        if not wide:
            break
        c = max(wide, key=lambda c: (c.min_tp, c.model.name))
        c.min_tp = max(t for t in facts.tps[c.model.name] if t < c.min_tp)  # base_tp is one
    allocate = _aligned_slots(cluster)
    devs: List[_Dev] = []
    for c in sorted((c for v in by_model.values() for c in v), key=lambda c: (-c.min_tp, c.model.name)):
        gpus = allocate(c.min_tp)
        if gpus is None:
            raise PlacementError(
                f"spatial placement: no free group of {c.min_tp} GPU(s) left for model "
                f"{c.model.name!r} ({c.model.config}/{c.model.preset}); the fleet needs "
                f"{sum(x.min_tp for v in by_model.values() for x in v)} GPUs, the cluster has "
                f"{cluster.num_gpus}", c.model.name)
        d = _Dev(gpus, cluster, facts)
        d.add(c)
        devs.append(d)
    grew = facts.cfg.replicate_leftover
    while grew:  # spare GPUs: one more replica of the most loaded model that still fits
        grew = False
        for _, c in sorted(((d.estimate().load, d.copies[0]) for d in devs),
                           key=lambda x: (-x[0], x[1].model.name)):
            gpus = allocate(c.min_tp)
            if gpus is None:
                continue
            siblings = [d.copies[0] for d in devs if d.copies[0].model.name == c.model.name]
            k = len(siblings) + 1
            for x in siblings:
                x.rate = c.model.rate / k
            new = _Dev(gpus, cluster, facts)
            new.add(_Copy(c.model, c.min_tp, c.model.rate / k, c.slo))
            devs.append(new)
            for d in devs:
                d.est = None
            grew = True
            break
    return devs


def _to_plan(policy: str, devs: List[_Dev], facts: _Facts, cluster: ClusterSpec,
             extra: Mapping[str, object]) -> PlacementPlan:
    devices, per_dev = [], {}
    used = sorted((d for d in devs if d.copies), key=lambda d: d.gpus[0])
    for i, d in enumerate(used):
        est = d.estimate()
        profs = d.profiles()
        arena = d.arena_bytes()
        parts = split_partitions(profs, arena, est.kv_demand_bytes)
        models = tuple(PlacedModel(
            name=c.model.name, config=c.model.config, preset=c.model.preset, rate=c.rate,
            slo_ttft_s=facts.slo[c.model.name], weight_bytes=facts.fp(c.model.name, d.tp).weight_bytes,
            min_kv_bytes=facts.min_kv(c.model.name, d.tp), kv_partition_bytes=parts[c.model.name])
            for c in d.copies)
        devices.append(DevicePlan(i, d.gpus, models, arena))
        per_dev[str(i)] = est.to_dict()
    estimates = {"devices": per_dev,
                 "tokens_per_s": sum(d.estimate().tokens_per_s for d in used),
                 "goodput_tokens_per_s": sum(d.estimate().goodput_tokens_per_s for d in used),
                 "slo_ttft_s": dict(facts.slo), "base_tp": dict(facts.base_tp), **extra}
    plan = PlacementPlan(cluster, tuple(devices), policy, facts.cfg.max_model_len,
                         facts.cfg.tokens_per_block, estimates)
    check_plan(plan)  # the placement must satisfy its own checker
    return plan


def place(models: Sequence[ServedModel], cluster: ClusterSpec, cost, policy: str = "fineserve",
          config: PlacementConfig = PlacementConfig()) -> PlacementPlan:
    """Place `models` on `cluster` with `policy` (see the module docstring).

    cost: a `CostModel` (prefill_time / decode_time / default_slo_ttft by config name).
    Raises PlacementError (naming the model) when a model fits nowhere or the fleet does not
    fit the cluster.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}; valid: {', '.join(POLICIES)}")
    facts = _Facts(models, cluster, cost, config)
    if policy == "spatial":
        devs = _spatial(facts.copies(), facts, cluster)
        return _to_plan(policy, devs, facts, cluster, {"partitions_evaluated": 1})
    sizes = [t for t in config.tp_choices if t <= cluster.gpus_per_node]

    def evaluate(partition, refine: bool):
        devs = _devices_for(partition, cluster, facts)
        failed = _greedy(policy, facts.copies(), devs, facts)
        if failed is not None:
            return None, devs, failed
        if refine:
            _improve(policy, devs, config.local_search_rounds)
        if config.replicate_leftover:
            _fill_leftover(devs, facts)
        return _objective(policy, devs), devs, None

    found, worst_fail, n_eval = [], None, 0
    for partition in cluster_partitions(cluster, sizes, config.max_partitions):
        key, devs, failed = evaluate(partition, refine=False)
        n_eval += 1
        if failed is not None:
            placed = sum(len(d.copies) for d in devs)
            if worst_fail is None or placed > worst_fail[0]:
                worst_fail = (placed, failed, partition)
            continue
        found.append((key, -n_eval, partition, devs))
    if not found:
        placed, name, partition = worst_fail
        m = facts.models[name]
        total = sum(facts.need(n, facts.base_tp[n]) for n in facts.models)
        raise PlacementError(
            f"{policy} placement: model {name!r} ({m.config}/{m.preset}) fits on no device in any "
            f"of {n_eval} TP-group partitions (best partition {partition} placed {placed} copies "
            f"first); the fleet needs {total / GiB:.1f} GiB of weights + minimum KV, the cluster "
            f"offers {cluster.num_gpus * cluster.usable_bytes_per_gpu / GiB:.1f} GiB", name)
    # The most promising partitions again, with local search between greedy and replicas.
    found.sort(key=lambda x: x[:2], reverse=True)
    best_key, _, best_partition, best_devs = found[0]
    for _, _, partition, _ in found[:config.refine_partitions]:
        key, devs, _ = evaluate(partition, refine=True)
        if key > best_key:
            best_key, best_partition, best_devs = key, partition, devs
    best = (best_devs, best_partition)
    devs, partition = best
    return _to_plan(policy, devs, facts, cluster,
                    {"partition": [list(p) for p in partition], "partitions_evaluated": n_eval,
                     "objective": list(best_key)})


# --------------------------------------------------------------------------------------
# Re-placement


@dataclasses.dataclass(frozen=True)
class Replan:
    plan: PlacementPlan
    kept: bool  # True: the old placement still holds (only rates changed)
    moved: Tuple[str, ...]  # models whose GPUs changed


def _gpu_sets(plan: PlacementPlan) -> Dict[str, frozenset]:
    return {n: frozenset(frozenset(d.gpus) for d, _ in v) for n, v in plan.instances().items()}


def replan(plan: PlacementPlan, models: Sequence[ServedModel], cost,
           config: Optional[PlacementConfig] = None) -> Replan:
    """Adapt `plan` to new rates (`models` carry the new rates; same names).

    Keeps every device as it is, with each copy's rate = new rate / copies, if all devices
    are still predicted feasible (load <= max_load and every model meets its SLO); else places
    again with the plan's policy. Returns the plan and the models whose GPUs changed.
    """
    config = config or PlacementConfig(max_model_len=plan.max_model_len,
                                       tokens_per_block=plan.tokens_per_block)
    by_name = {m.name: m for m in models}
    inst = plan.instances()
    if set(by_name) == set(inst):
        facts = _Facts(models, plan.cluster, cost, config)
        devices, ok = [], True
        for d in plan.devices:
            placed = tuple(dataclasses.replace(pm, rate=by_name[pm.name].rate / len(inst[pm.name]),
                                               slo_ttft_s=facts.slo[pm.name]) for pm in d.models)
            profs = [facts.profile(pm.name, d.tp, pm.rate) for pm in placed]
            est = estimate_device(profs, d.kv_arena_bytes, max_load=config.max_load,
                                  kv_headroom=config.kv_headroom)
            ok = ok and est.load <= config.max_load and all(est.slo_ok.values())
            devices.append(dataclasses.replace(d, models=placed))
        if ok:
            return Replan(dataclasses.replace(plan, devices=tuple(devices)), True, ())
    new = place(models, plan.cluster, cost, plan.policy, config)
    old_sets, new_sets = _gpu_sets(plan), _gpu_sets(new)
    moved = tuple(sorted(n for n in new_sets if old_sets.get(n) != new_sets[n]))
    return Replan(new, False, moved)

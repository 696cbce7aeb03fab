"""Routing requests to the devices of a placement plan: the one router of the simulator and of
real nodes and clusters (`cluster.node`, `cluster.ray_cluster`), so simulated and real
clusters route alike. Pure Python.

A model on one device: every request goes there. A replicated model: each request goes to the
copy with the least outstanding work, decided in one pass before the devices run (so the
devices stay independent: simulated separately, or served by engines that never wait for each
other). Outstanding work of a copy = the requests routed to it that are predicted to be still
in flight at the arrival time, each weighted by the copy's predicted decode round (the TPOT
estimate of its device, `load_estimate.estimate_device`): a request is predicted to finish at
arrival + prefill + output_len x TPOT. Ties go to the copy that has received the fewest
requests, then the lowest device id, so equal copies alternate.

A request is anything with `request_id`, `model`, `arrival_s`, `prompt_len` and `output_len`
(a workload's `WorkloadRequest`, or a `RouteItem` made from an engine request).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Dict, List, Mapping, Sequence, Tuple, TypeVar

from fineserve_jax.scheduler.footprint import footprint
from fineserve_jax.scheduler.load_estimate import estimate_device, profile_model
from fineserve_jax.scheduler.plan import PlacementPlan

R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class RouteItem:
    """What the router reads of a request."""

    request_id: int
    model: str
    arrival_s: float
    prompt_len: int
    output_len: int


def mean_lengths(requests: Sequence) -> Dict[str, Tuple[float, float]]:
    """model -> (mean prompt, mean output) tokens of its requests."""
    acc: Dict[str, List[float]] = {}
    for r in requests:
        a = acc.setdefault(r.model, [0.0, 0.0, 0])
        a[0] += r.prompt_len
        a[1] += r.output_len
        a[2] += 1
    return {m: (a[0] / a[2], a[1] / a[2]) for m, a in acc.items()}


def device_tpot(plan: PlacementPlan, cost, lengths: Mapping[str, Tuple[float, float]],
                default_lengths: Tuple[float, float] = (161.0, 338.0)) -> Dict[int, float]:
    """Predicted decode round (s) of every device, at the plan's rates."""
    out = {}
    for d in plan.devices:
        profs = []
        for m in d.models:
            p, o = lengths.get(m.name, default_lengths)
            fp = footprint(m.config, m.preset, plan.tokens_per_block, d.tp)
            profs.append(profile_model(cost, m.name, m.config, m.preset, d.tp, m.rate, p, o, m.slo_ttft_s,
                                       fp.kv_bytes_per_token, m.weight_bytes, m.min_kv_bytes))
        tau = estimate_device(profs, d.kv_arena_bytes).tpot_s
        out[d.id] = tau if math.isfinite(tau) and tau > 0 else 1.0
    return out


def route(requests: Sequence[R], plan: PlacementPlan, cost
          ) -> Tuple[Dict[int, List[R]], List[R]]:
    """Split `requests` over the plan's devices.

    Returns ({device id: its requests in arrival order}, requests for models the plan does not
    place).
    """
    inst = plan.instances()
    per_dev: Dict[int, List[R]] = {d.id: [] for d in plan.devices}
    unplaced: List[R] = []
    replicated = {n for n, v in inst.items() if len(v) > 1}
    tau = device_tpot(plan, cost, mean_lengths(requests)) if replicated else {}
    # Per replicated model and copy: heap of predicted finish times, routed count.
    inflight: Dict[Tuple[str, int], List[float]] = {}
    routed: Dict[Tuple[str, int], int] = {}
    for r in sorted(requests, key=lambda r: (r.arrival_s, r.request_id)):
        copies = inst.get(r.model)
        if not copies:
            unplaced.append(r)
            continue
        if len(copies) == 1:
            per_dev[copies[0][0].id].append(r)
            continue
        best, best_key = None, None
        for d, m in copies:
            k = (r.model, d.id)
            h = inflight.setdefault(k, [])
            while h and h[0] <= r.arrival_s:
                heapq.heappop(h)
            key = (len(h) * tau[d.id], routed.get(k, 0), d.id)
            if best_key is None or key < best_key:
                best, best_key = d, key
        k = (r.model, best.id)
        m = best.model(r.model)
        pf = cost.prefill_time(m.config, m.preset, max(r.prompt_len, 1), 1, 0, best.tp)
        heapq.heappush(inflight[k], r.arrival_s + pf + r.output_len * tau[best.id])
        routed[k] = routed.get(k, 0) + 1
        per_dev[best.id].append(r)
    return per_dev, unplaced


def prompt_len(req) -> int:
    """Tokens of an engine request's prompt for routing (text prompts: their UTF-8 bytes, a
    byte tokenizer's count and an upper bound for subword tokenizers)."""
    p = req.prompt
    return len(p.encode("utf-8")) if isinstance(p, str) else len(p)


def route_requests(requests: Sequence[R], plan: PlacementPlan, cost
                   ) -> Tuple[Dict[int, List[R]], List[R]]:
    """`route` for engine requests (`core.request.Request`, ids unique): prompt length from the
    prompt, output length = `sampling.max_tokens`. Same result as `route` on the workload
    requests they were made from."""
    by_id = {r.request_id: r for r in requests}
    if len(by_id) != len(requests) or None in by_id:
        raise ValueError("route_requests needs unique request ids")
    items = [RouteItem(r.request_id, r.model, r.arrival_s, prompt_len(r), r.sampling.max_tokens)
             for r in requests]
    per, unplaced = route(items, plan, cost)
    return ({d: [by_id[i.request_id] for i in v] for d, v in per.items()},
            [by_id[i.request_id] for i in unplaced])

"""Steady-state load of a device (a TP group shared in time by several models), predicted
from the cost model in closed form. The global placement scores candidate placements with
it; it is an estimate, the simulator gives the real answer. Pure Python.

Per model m on the device (rate r_m req/s, mean prompt P_m and output O_m tokens, decode
step time d_m(B) = base_m + B * slope_m at the mean context P_m + O_m / 2, from the cost
model at the device's tp):

    work per request    w_m = prefill_m(P_m) + O_m * slope_m       (device seconds)
    load                rho = sum_m r_m * w_m                       (must stay < 1)
    decode round        tau = sum_m base_m / (1 - rho)
        every running model takes one decode step per round, so tau is the TPOT; each
        request needs O_m rounds, so by Little's law B_m = r_m * O_m * tau sequences decode
        concurrently and rho + sum base_m / tau = 1 closes the balance.
    KV demand           sum_m B_m * kv_m,   kv_m = (P_m + O_m / 2) * KV bytes per token
    TTFT                prefill_m(P_m) + tau + rho_p / (1 - rho_p) * mean prefill
                        (wait for the running round, then an M/M/1-like prefill queue;
                        rho_p = sum_m r_m * prefill_m)
    marginal memory efficiency (FineServe's MME)
                        mu_m = 1 / (tau * kv_m)   output tokens/s per extra byte of KV:
                        one more byte holds 1 / kv_m more running requests, each of which
                        emits one token per round.

When the KV demand exceeds the arena, concurrency (and so throughput) shrinks: a shared
arena (KV slab) serves every model the fraction arena / demand; static partitions serve
model m the fraction partition_m / demand_m. Overload (rho >= 1) serves 1 / rho. The demand
is a mean; lengths are heavy-tailed and arrivals bursty, so memory is compared against
`kv_headroom` x the mean demand (2 by default: with less, the simulated devices preempt).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Mapping, Optional, Sequence

INF = float("inf")


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """The numbers the estimator needs for one model copy at one tp (seconds, bytes)."""

    name: str
    config: str
    preset: str
    tp: int
    rate: float
    prompt_len: float
    output_len: float
    slo_ttft_s: Optional[float]
    prefill_s: float  # one prefill of a mean prompt (batch 1)
    decode_base_s: float  # decode step time at batch 0 (weights, launch)
    decode_per_seq_s: float  # extra decode step time per sequence at the mean context
    kv_bytes_per_request: float  # mean KV held by a running request
    weight_bytes: int
    min_kv_bytes: int

    @property
    def work_s(self) -> float:
        """Device seconds one request costs beyond the per-round fixed part."""
        return self.prefill_s + self.output_len * self.decode_per_seq_s

    def with_rate(self, rate: float) -> "ModelProfile":
        return dataclasses.replace(self, rate=float(rate))


def profile_model(cost, name: str, config: str, preset: str, tp: int, rate: float,
                  prompt_len: float, output_len: float, slo_ttft_s: Optional[float],
                  kv_bytes_per_token: float, weight_bytes: int, min_kv_bytes: int) -> ModelProfile:
    """Query the cost model (`CostModel` API) for one model copy at `tp`."""
    p = max(int(round(prompt_len)), 1)
    ctx = prompt_len + output_len / 2.0
    d1 = cost.decode_time(config, preset, 1, ctx, tp)
    d2 = cost.decode_time(config, preset, 2, ctx, tp)
    slope = max(d2 - d1, 0.0)  # the cost model is linear in the batch
    return ModelProfile(
        name=name, config=config, preset=preset, tp=tp, rate=float(rate),
        prompt_len=float(prompt_len), output_len=float(output_len), slo_ttft_s=slo_ttft_s,
        prefill_s=cost.prefill_time(config, preset, p, 1, 0, tp),
        decode_base_s=max(d1 - slope, 0.0), decode_per_seq_s=slope,
        kv_bytes_per_request=ctx * kv_bytes_per_token, weight_bytes=int(weight_bytes),
        min_kv_bytes=int(min_kv_bytes))


@dataclasses.dataclass(frozen=True)
class DeviceEstimate:
    load: float  # rho
    tpot_s: float  # tau (inf when overloaded)
    kv_arena_bytes: float
    kv_demand_bytes: Dict[str, float]
    served: Dict[str, float]  # fraction of each model's requests the device keeps up with
    ttft_s: Dict[str, float]
    slo_ok: Dict[str, bool]
    mme: Dict[str, float]  # output tokens/s per extra KV byte
    tokens_per_s: float  # output tokens/s served
    goodput_tokens_per_s: float  # output tokens/s of the models predicted to meet their SLO

    @property
    def kv_pressure(self) -> float:
        """KV demand / arena (> 1: memory-bound)."""
        d = sum(self.kv_demand_bytes.values())
        return d / self.kv_arena_bytes if self.kv_arena_bytes > 0 else INF

    def to_dict(self) -> Dict[str, object]:
        fin = lambda x: None if not math.isfinite(x) else x  # noqa: E731  (JSON has no inf)
        return {"load": fin(self.load), "tpot_s": fin(self.tpot_s),
                "kv_pressure": fin(self.kv_pressure), "tokens_per_s": self.tokens_per_s,
                "goodput_tokens_per_s": self.goodput_tokens_per_s,
                "served": dict(self.served), "ttft_s": {k: fin(v) for k, v in self.ttft_s.items()},
                "slo_ok": dict(self.slo_ok)}


def estimate_device(profiles: Sequence[ModelProfile], kv_arena_bytes: float,
                    partitions: Optional[Mapping[str, float]] = None,
                    max_load: float = 0.9, kv_headroom: float = 2.0) -> DeviceEstimate:
    """Predict the steady state of `profiles` sharing one device (see the module docstring).

    partitions: static per-model KV bytes (baselines); None: one shared arena.
    max_load: a model meets its SLO only if rho <= max_load (queueing blows up near 1).
    kv_headroom: memory must hold this multiple of the mean KV demand.
    """
    active = [p for p in profiles if p.rate > 0]
    rho = sum(p.rate * p.work_s for p in active)
    rho_p = sum(p.rate * p.prefill_s for p in active)
    base = sum(p.decode_base_s for p in active)
    tau = base / (1.0 - rho) if rho < 1.0 else INF
    over = 1.0 / rho if rho > 1.0 else 1.0
    demand = {}
    for p in profiles:
        conc = p.rate * p.output_len * tau if math.isfinite(tau) else INF
        demand[p.name] = conc * p.kv_bytes_per_request if p.rate > 0 else 0.0
    served = {}
    total = sum(demand.values())
    h = kv_headroom
    for p in profiles:
        if not math.isfinite(tau):
            mem = 1.0  # overloaded: the queue, not memory, is the limit (served = 1 / rho)
        elif partitions is not None:
            room = partitions.get(p.name, 0.0)
            mem = 1.0 if h * demand[p.name] <= room else room / (h * demand[p.name])
        else:
            mem = 1.0 if h * total <= kv_arena_bytes else kv_arena_bytes / (h * total)
        served[p.name] = min(mem, over)
    mean_pf = rho_p / sum(p.rate for p in active) if active else 0.0
    wait = rho_p / (1.0 - rho_p) * mean_pf if rho_p < 1.0 else INF
    ttft, ok, mme = {}, {}, {}
    tokens = good = 0.0
    for p in profiles:
        ttft[p.name] = p.prefill_s + tau + wait
        ok[p.name] = bool(rho <= max_load and served[p.name] >= 0.999
                          and (p.slo_ttft_s is None or ttft[p.name] <= p.slo_ttft_s))
        mme[p.name] = 1.0 / (tau * p.kv_bytes_per_request) if 0 < tau < INF else (INF if tau == 0 else 0.0)
        t = p.rate * p.output_len * served[p.name]
        tokens += t
        good += t if ok[p.name] else 0.0
    return DeviceEstimate(rho, tau, float(kv_arena_bytes), demand, served, ttft, ok, mme, tokens, good)


def split_partitions(profiles: Sequence[ModelProfile], kv_arena_bytes: int,
                     demand: Mapping[str, float]) -> Dict[str, int]:
    """Static per-model KV partitions (the baselines' memory split): each model first gets
    its minimum (one longest sequence), the rest of the arena in proportion to its predicted
    KV demand (equal shares when no demand is predicted). The most favourable static split the
    baseline could choose from the same estimates the placement used."""
    mins = {p.name: p.min_kv_bytes for p in profiles}
    rest = max(int(kv_arena_bytes) - sum(mins.values()), 0)
    w = {p.name: (demand.get(p.name, 0.0) if math.isfinite(demand.get(p.name, 0.0)) else 1.0)
         for p in profiles}
    tot = sum(w.values())
    if tot <= 0:
        w = {n: 1.0 for n in w}
        tot = float(len(w))
    return {n: mins[n] + int(rest * w[n] / tot) for n in mins}

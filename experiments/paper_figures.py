"""FineServe's evaluation, reproduced in the simulator: SLO attainment vs request rate and vs
SLO scale, and token throughput, for FineServe vs the GPU-sharing baselines.

    python -m experiments.paper_figures --output_dir=runs/paper          # ~6-10 min, 2 CPUs
    python -m experiments.paper_figures --quick --output_dir=/tmp/paper  # seconds (tests)

Scenarios (`fineserve_jax.sim.fleets`):
  (i)   pair8b  Llama-3.1-8B org + fp8_kv8 on one H100 (the authors' example, 5 + 5 req/s at
                rate scale 1)
  (ii)  mixed8  8 mixed-precision 8B / 32B / 70B models on 8 H100s
  (iii) lmsys   MuxServe's LMSYS-Chat rates, 16 LLaMA models on 32 H100s
Systems (`fineserve_jax.sim.config.SYSTEMS`): fineserve (its placement + KV slab + saab),
muxserve (greedy placement + static KV partitions + round-robin), prism (KV-pressure
placement + shared KV + round-robin), spatial (dedicated GPUs); the ablations fineserve-static,
fineserve-rr and muxserve-slab at each scenario's operating point.

Metrics per run: SLO attainment (TTFT < SLO; dropped requests miss), token throughput =
output tokens generated during the arrival window / window (the steady-state rate; the drain
after the last arrival is left out), goodput, TTFT/TPOT percentiles, drops, preemptions.
Operating point of a scenario: the highest swept rate at which FineServe still attains >= 90 %
(the knee), and `capacity@90%` = the highest rate (interpolated) at which a system attains
>= 90 %. Ratios FineServe / MuxServe-style are printed side by side with the paper's claims
(up to 2.2x SLO attainment, 1.8x throughput).

Writes OUTPUT_DIR/results.csv (one row per run), OUTPUT_DIR/ratios.json and
OUTPUT_DIR/<scenario>.png (three panels: SLO vs rate, SLO vs SLO scale, throughput vs rate).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app, flags

from experiments.flag_checks import check_paper_figures_flags

_OUT = flags.DEFINE_string("output_dir", "runs/paper", "where to write results.csv, ratios.json, PNGs")
_QUICK = flags.DEFINE_boolean("quick", False, "tiny sweeps and durations (for tests)")
_SCENARIOS = flags.DEFINE_list("scenarios", ["pair8b", "mixed8", "lmsys"], "scenarios to run")
_SYSTEMS = flags.DEFINE_list("systems", ["fineserve", "muxserve", "prism", "spatial"],
                             "systems in the sweeps")
_SLO_SYSTEMS = flags.DEFINE_list("slo_systems", ["fineserve", "muxserve"],
                                 "systems in the SLO-scale sweeps")
_ABLATIONS = flags.DEFINE_list("ablations", ["fineserve-static", "fineserve-rr", "muxserve-slab"],
                               "systems run at the operating point only")
_WORKERS = flags.DEFINE_integer("workers", 2, "runs in parallel (processes)")
_SEED = flags.DEFINE_integer("seed", 0, "workload seed")

PAPER_SLO_RATIO = 2.2
PAPER_TPT_RATIO = 1.8
BASELINE = "muxserve"


@dataclasses.dataclass(frozen=True)
class Scenario:
    fleet: str
    rate_scales: Tuple[float, ...]
    slo_scales: Tuple[float, ...]
    duration_s: float
    default_slo_scale: float = 40.0


FULL = {
    "pair8b": Scenario("pair8b", (1, 2, 4, 6, 8, 10), (1, 2, 5, 10, 40), 60.0),
    "mixed8": Scenario("mixed8", (1, 2, 3, 4, 5, 6), (1, 2, 5, 10, 40), 60.0),
    "lmsys": Scenario("lmsys", (1, 2, 4, 6, 8), (1, 5, 40), 40.0),
}
QUICK = {
    "pair8b": Scenario("pair8b", (2, 8), (5, 40), 5.0),
    "mixed8": Scenario("mixed8", (1, 4), (5, 40), 5.0),
    "lmsys": Scenario("lmsys", (1, 8), (10, 40), 5.0),
}


@dataclasses.dataclass(frozen=True)
class Job:
    scenario: str
    sweep: str  # "rate" | "slo" | "ablation"
    system: str
    rate_scale: float
    slo_scale: float
    duration_s: float
    seed: int


_COST = {}


def _cost():
    if "cm" not in _COST:
        from fineserve_jax.scheduler.cost import load_cost_model

        _COST["cm"] = load_cost_model()
    return _COST["cm"]


def window_tokens_per_s(records, window_s: float) -> float:
    """Output tokens emitted during [0, window_s] per second."""
    n = 0
    for r in records:
        for t in r.token_times_s or ():
            if t <= window_s:
                n += 1
    return n / window_s if window_s > 0 else 0.0


def run_job(job: Job) -> Dict[str, object]:
    """Place the scenario's fleet with the system's policy and simulate it; one result row."""
    from fineserve_jax.scheduler.placement import PlacementConfig, PlacementError
    from fineserve_jax.sim import get_system, run_system
    from fineserve_jax.sim.fleets import fleet_workload, get_fleet

    t0 = time.perf_counter()
    fleet = get_fleet(job.scenario).scaled(job.rate_scale)
    if job.system == "spatial" and len(fleet.models) > fleet.cluster.num_gpus:
        return {**dataclasses.asdict(job), "error": "spatial needs one GPU per model"}
    reqs = fleet_workload(fleet, duration_s=job.duration_s, seed=job.seed)
    try:
        res = run_system(get_system(job.system), fleet.models, fleet.cluster, reqs, _cost(),
                         PlacementConfig(slo_scale=job.slo_scale), workers=1)
    except PlacementError as e:
        return {**dataclasses.asdict(job), "error": str(e)}
    s = res.summary()
    o = s["overall"]
    return {**dataclasses.asdict(job), "error": "", "total_rate": fleet.total_rate,
            "requests": o["requests"], "slo_attainment": o["slo_attainment"],
            "tokens_per_s": window_tokens_per_s(res.records, job.duration_s),
            "goodput_rps": o["goodput_rps"], "dropped": o["dropped"], "failed": o["failed"],
            "preemptions": o["preemptions"], "ttft_p50_s": o["ttft_s"]["p50"],
            "ttft_p99_s": o["ttft_s"]["p99"], "tpot_p50_s": o["tpot_s"]["p50"],
            "devices": len(res.plan.devices), "sim_wall_s": time.perf_counter() - t0}


def rate_jobs(name: str, sc: Scenario, systems: Sequence[str], seed: int) -> List[Job]:
    return [Job(name, "rate", s, r, sc.default_slo_scale, sc.duration_s, seed)
            for r in sc.rate_scales for s in systems]


def operating_point(rows: List[dict], sc: Scenario) -> float:
    """The highest swept rate scale at which FineServe attains >= 90 % (the lowest if none)."""
    ok = [r["rate_scale"] for r in rows if r["sweep"] == "rate" and r["system"] == "fineserve"
          and not r["error"] and (r["slo_attainment"] or 0) >= 0.9]
    return max(ok) if ok else min(sc.rate_scales)


def capacity_at(rows: List[dict], system: str, target: float = 0.9) -> Optional[float]:
    """Highest total rate (req/s, linearly interpolated) with attainment >= target."""
    pts = sorted((r["total_rate"], r["slo_attainment"] or 0.0) for r in rows
                 if r["sweep"] == "rate" and r["system"] == system and not r["error"])
    if not pts or pts[0][1] < target:
        return None
    cap = pts[0][0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y1 >= target:
            cap = x1
            continue
        cap = x0 + (x1 - x0) * (y0 - target) / (y0 - y1) if y0 > y1 else x0
        break
    return cap


def ratios(rows: List[dict], scenario: str) -> Dict[str, object]:
    """FineServe / baseline ratios per swept point, their maxima, and at the operating point."""
    out: Dict[str, object] = {"points": []}
    sel = [r for r in rows if r["scenario"] == scenario and not r["error"]]
    for sweep, key in (("rate", "rate_scale"), ("slo", "slo_scale")):
        for x in sorted({r[key] for r in sel if r["sweep"] == sweep}):
            fs = [r for r in sel if r["sweep"] == sweep and r[key] == x and r["system"] == "fineserve"]
            bl = [r for r in sel if r["sweep"] == sweep and r[key] == x and r["system"] == BASELINE]
            if not fs or not bl:
                continue
            f, b = fs[0], bl[0]
            out["points"].append({
                "sweep": sweep, key: x, "total_rate": f["total_rate"],
                "slo_fineserve": f["slo_attainment"], "slo_baseline": b["slo_attainment"],
                "slo_ratio": _ratio(f["slo_attainment"], b["slo_attainment"]),
                "tpt_fineserve": f["tokens_per_s"], "tpt_baseline": b["tokens_per_s"],
                "tpt_ratio": _ratio(f["tokens_per_s"], b["tokens_per_s"])})
    pts = out["points"]
    out["max_slo_ratio"] = max((p["slo_ratio"] for p in pts if p["slo_ratio"]), default=None)
    out["max_tpt_ratio"] = max((p["tpt_ratio"] for p in pts if p["tpt_ratio"]), default=None)
    cf, cb = capacity_at(sel, "fineserve"), capacity_at(sel, BASELINE)
    out["capacity90_fineserve"], out["capacity90_baseline"] = cf, cb
    out["capacity90_ratio"] = _ratio(cf, cb)
    return out


def _ratio(a, b):
    if a is None or b is None:
        return None
    return a / b if b > 0 else (float("inf") if a > 0 else None)


def plot(rows: List[dict], scenario: str, op: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["scenario"] == scenario and not r["error"]]
    systems = sorted({r["system"] for r in sel if r["sweep"] != "ablation"})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for s in systems:
        rr = sorted((r for r in sel if r["sweep"] == "rate" and r["system"] == s), key=lambda r: r["total_rate"])
        if rr:
            axes[0].plot([r["total_rate"] for r in rr], [r["slo_attainment"] for r in rr], "o-", label=s)
            axes[2].plot([r["total_rate"] for r in rr], [r["tokens_per_s"] for r in rr], "o-", label=s)
        ss = sorted((r for r in sel if r["sweep"] == "slo" and r["system"] == s), key=lambda r: r["slo_scale"])
        if ss:
            axes[1].plot([r["slo_scale"] for r in ss], [r["slo_attainment"] for r in ss], "o-", label=s)
    axes[0].set(xlabel="total request rate (req/s)", ylabel="SLO attainment", ylim=(0, 1.05),
                title=f"{scenario}: SLO attainment vs rate")
    axes[1].set(xlabel="SLO scale (x single-request TTFT)", ylabel="SLO attainment", ylim=(0, 1.05),
                xscale="log", title=f"vs SLO scale (rate x{op:g})")
    axes[2].set(xlabel="total request rate (req/s)", ylabel="output tokens/s (arrival window)",
                title="token throughput")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x, f="{:.2f}"):
    return "-" if x is None else f.format(x)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    table = QUICK if _QUICK.value else FULL
    check_paper_figures_flags(scenarios=_SCENARIOS.value, valid_scenarios=list(table),
                              systems=_SYSTEMS.value, slo_systems=_SLO_SYSTEMS.value,
                              ablations=_ABLATIONS.value, workers=_WORKERS.value)
    os.makedirs(_OUT.value, exist_ok=True)
    t0 = time.perf_counter()
    _cost()  # load once before forking
    rows: List[dict] = []
    workers = max(1, _WORKERS.value)
    with ProcessPoolExecutor(max_workers=workers) as ex:
        # Stage 1: rate sweeps; stage 2 (needs the operating point): SLO sweeps and ablations.
        stage1 = [j for name in _SCENARIOS.value
                  for j in rate_jobs(name, table[name], _SYSTEMS.value, _SEED.value)]
        rows += list(ex.map(run_job, stage1))
        ops = {name: operating_point([r for r in rows if r["scenario"] == name], table[name])
               for name in _SCENARIOS.value}
        stage2 = []
        for name in _SCENARIOS.value:
            sc = table[name]
            stage2 += [Job(name, "slo", s, ops[name], x, sc.duration_s, _SEED.value)
                       for x in sc.slo_scales for s in _SLO_SYSTEMS.value]
            stage2 += [Job(name, "ablation", s, ops[name], sc.default_slo_scale, sc.duration_s, _SEED.value)
                       for s in _ABLATIONS.value]
        rows += list(ex.map(run_job, stage2))
    fields = ["scenario", "sweep", "system", "rate_scale", "slo_scale", "duration_s", "seed", "total_rate",
              "requests", "slo_attainment", "tokens_per_s", "goodput_rps", "dropped", "failed",
              "preemptions", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "devices", "sim_wall_s", "error"]
    with open(os.path.join(_OUT.value, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    report = {}
    for name in _SCENARIOS.value:
        rt = ratios(rows, name)
        op = ops[name]
        at_op = [p for p in rt["points"] if p["sweep"] == "rate" and p["rate_scale"] == op]
        rt["operating_point_rate_scale"] = op
        rt["at_operating_point"] = at_op[0] if at_op else None
        rt["ablations"] = {r["system"]: {k: r.get(k) for k in ("slo_attainment", "tokens_per_s", "dropped",
                                                                "preemptions", "error")}
                           for r in rows if r["scenario"] == name and r["sweep"] in ("ablation", "rate")
                           and r["rate_scale"] == op}
        report[name] = rt
        plot(rows, name, op, os.path.join(_OUT.value, f"{name}.png"))
    report["paper_claims"] = {"slo_ratio": PAPER_SLO_RATIO, "throughput_ratio": PAPER_TPT_RATIO}
    report["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(_OUT.value, "ratios.json"), "w") as f:
        json.dump(report, f, indent=2)

    print(f"\nFineServe / {BASELINE} (simulated; paper: up to {PAPER_SLO_RATIO}x SLO attainment, "
          f"{PAPER_TPT_RATIO}x token throughput)")
    print(f"{'scenario':<8} {'sweep':<5} {'x':>6} {'rate':>7} | {'SLO fs':>6} {'SLO mx':>6} {'ratio':>6} | "
          f"{'tok/s fs':>9} {'tok/s mx':>9} {'ratio':>6}")
    for name in _SCENARIOS.value:
        for p in report[name]["points"]:
            x = p.get("rate_scale", p.get("slo_scale"))
            slo = f"{_fmt(p['slo_fineserve']):>6} {_fmt(p['slo_baseline']):>6} {_fmt(p['slo_ratio']):>6}"
            tpt = (f"{_fmt(p['tpt_fineserve'], '{:.0f}'):>9} {_fmt(p['tpt_baseline'], '{:.0f}'):>9} "
                   f"{_fmt(p['tpt_ratio']):>6}")
            print(f"{name:<8} {p['sweep']:<5} {x:>6g} {p['total_rate']:>7.1f} | {slo} | {tpt}")
    print()
    for name in _SCENARIOS.value:
        rt = report[name]
        a = rt["at_operating_point"] or {}
        print(f"{name}: operating point rate x{rt['operating_point_rate_scale']:g}: SLO ratio "
              f"{_fmt(a.get('slo_ratio'))}, throughput ratio {_fmt(a.get('tpt_ratio'))}; max over sweeps: "
              f"SLO {_fmt(rt['max_slo_ratio'])}, throughput {_fmt(rt['max_tpt_ratio'])}; capacity@90% "
              f"{_fmt(rt['capacity90_fineserve'], '{:.1f}')} vs {_fmt(rt['capacity90_baseline'], '{:.1f}')} "
              f"req/s (x{_fmt(rt['capacity90_ratio'])})")
        abl = ", ".join(f"{k} {_fmt(v['slo_attainment'], '{:.3f}')}" for k, v in sorted(rt["ablations"].items())
                        if not v.get("error"))
        print(f"    SLO attainment at the operating point: {abl}")
    print(f"\n{len(rows)} runs in {report['wall_s']:.0f} s; wrote {_OUT.value}/results.csv, ratios.json, "
          f"{', '.join(n + '.png' for n in _SCENARIOS.value)}")


if __name__ == "__main__":
    app.run(main)

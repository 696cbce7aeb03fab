"""The cluster simulator: place a fleet of models on GPUs, simulate a workload on the plan, and
write the same summary.json schema as `experiments.serve`.

    python -m experiments.simulate --output_dir=runs/simulate
    python -m experiments.simulate --trace=../shared/data/traces/azure_llm_conv_2023.csv \
        --output_dir=runs/sim_trace
    python -m experiments.simulate --fleet=lmsys --duration_s=600 --system=muxserve

Defaults (no flags): the mixed-precision fleet (`fleets.mixed8`: 8 models, Llama-3.1-8B /
Qwen2.5-32B / Llama-3.1-70B in seven presets, power-law rates) on one node of 8 H100s, placed
by FineServe's policy, 300 s of Poisson arrivals with ShareGPT-like lengths, TTFT SLO = 40 x
the profiled single-request TTFT of a 903-token prompt + 4 ms, step times from the shared
FineServe profiles. With --trace, the trace's own arrivals and lengths (the first
--duration_s trace seconds) are spread over the fleet's models in proportion to their rates.

Writes OUTPUT_DIR/summary.json (metrics.summarize + "kv" + "compile" + "placement" + "sim"),
OUTPUT_DIR/plan.json and OUTPUT_DIR/latency.png, and prints a table and the simulation time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags

from experiments.plots import latency_plot

_FLEET = flags.DEFINE_string("fleet", "mixed8", "fleet: pair8b | mixed8 | lmsys (fineserve_jax.sim.fleets)")
_SYSTEM = flags.DEFINE_string(
    "system", "fineserve", "system (placement + KV + scheduling): fineserve, muxserve, prism, "
    "spatial, fineserve-static, fineserve-rr, muxserve-slab")
_PLAN = flags.DEFINE_string("plan", None, "a placement plan JSON (skips placement; the system "
                            "still sets the KV mode and scheduling)")
_RATE_SCALE = flags.DEFINE_float("rate_scale", 1.0, "multiply every model's rate")
_DURATION = flags.DEFINE_float("duration_s", 300.0, "workload length (s); with --trace, the trace "
                               "window (trace seconds); 0: the whole trace")
_NUM = flags.DEFINE_integer("num_requests", 0, "if > 0: exactly this many requests")
_ARRIVAL = flags.DEFINE_enum("arrival", "poisson", ["poisson", "gamma"], "arrival process")
_CV = flags.DEFINE_float("cv", 1.0, "gamma arrivals: coefficient of variation")
_TRACE = flags.DEFINE_string("trace", None, "Azure LLM trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)")
_TRACE_START = flags.DEFINE_float("trace_start_s", 0.0, "trace window start (trace seconds)")
_TRACE_SCALE = flags.DEFINE_float("trace_time_scale", None, "compress trace time by this factor")
_TRACE_RATE = flags.DEFINE_float("trace_target_rate", None, "rescale the trace window to this rate")
_SLO_SCALE = flags.DEFINE_float("slo_scale", 40.0, "TTFT SLO = scale x TTFT(903-token prompt) + 4 ms")
_MAXLEN = flags.DEFINE_integer("max_model_len", 0, "longest prompt + output (0: 4096, or 16384 "
                               "with --trace)")
_NODES = flags.DEFINE_integer("nodes", 0, "override the fleet's node count")
_GPUS = flags.DEFINE_integer("gpus_per_node", 0, "override the fleet's GPUs per node")
_MEM = flags.DEFINE_float("gpu_memory_gib", 0.0, "override GPU memory (GiB)")
_PROFILES = flags.DEFINE_list("profiles", [], "cost-model CSVs (default: the shared FineServe profiles)")
_WORKERS = flags.DEFINE_integer("workers", 2, "processes simulating devices in parallel (0: all CPUs)")
_SEED = flags.DEFINE_integer("seed", 0, "workload seed")
_OUT = flags.DEFINE_string("output_dir", "runs/simulate", "where to write summary.json, plan.json, latency.png")


def with_workload_lengths(fleet, requests):
    """The fleet with each model's mean prompt/output lengths taken from its requests."""
    from fineserve_jax.sim.routing import mean_lengths

    lens = mean_lengths(requests)
    ms = tuple(dataclasses.replace(m, prompt_len=lens[m.name][0], output_len=lens[m.name][1])
               if m.name in lens else m for m in fleet.models)
    return dataclasses.replace(fleet, models=ms)




def main(argv):
    del argv
    from fineserve_jax import metrics
    from fineserve_jax.scheduler.footprint import GiB
    from fineserve_jax.scheduler.placement import PlacementConfig, place
    from fineserve_jax.scheduler.plan import PlacementPlan
    from fineserve_jax.sim import get_system, simulate
    from fineserve_jax.sim.fleets import fleet_workload, get_fleet
    from fineserve_jax.sim.step_cost import load_cost_model

    t0 = time.perf_counter()
    cost = load_cost_model(_PROFILES.value)
    system = get_system(_SYSTEM.value)
    fleet = get_fleet(_FLEET.value).scaled(_RATE_SCALE.value)
    over = {k: v for k, v in (("nodes", _NODES.value), ("gpus_per_node", _GPUS.value),
                              ("gpu_memory_bytes", int(_MEM.value * GiB))) if v}
    if over:
        fleet = fleet.with_cluster(**over)
    max_len = _MAXLEN.value or (16384 if _TRACE.value else 4096)
    if _TRACE.value:
        duration = _DURATION.value or None  # the trace window; None: the whole trace
    else:
        duration = None if _NUM.value else _DURATION.value
    requests = fleet_workload(
        fleet, duration_s=duration, num_requests=_NUM.value or None, arrival=_ARRIVAL.value, cv=_CV.value, seed=_SEED.value,
        trace=_TRACE.value, trace_start_s=_TRACE_START.value, trace_time_scale=_TRACE_SCALE.value,
        trace_target_rate=_TRACE_RATE.value)
    if not requests:
        raise app.UsageError("the workload is empty (check --duration_s / --num_requests / the trace)")
    fleet = with_workload_lengths(fleet, requests)
    pcfg = PlacementConfig(max_model_len=max_len, slo_scale=_SLO_SCALE.value)
    if _PLAN.value:
        plan = PlacementPlan.load(_PLAN.value)
    else:
        plan = place(fleet.models, fleet.cluster, cost, system.placement, pcfg)
    slos = plan.model_slos()
    requests = [dataclasses.replace(r, slo_ttft_s=slos.get(r.model)) if r.slo_ttft_s is None else r
                for r in requests]
    t_place = time.perf_counter() - t0
    print(plan.describe())
    sim = dataclasses.replace(system.sim, workers=_WORKERS.value)
    result = simulate(plan, requests, cost, sim, system=system.name)
    summary = result.summary()
    summary["config"] = {
        "fleet": fleet.name, "system": system.name, "rate_scale": _RATE_SCALE.value,
        "rates": {m.name: m.rate for m in fleet.models}, "slo_ttft_s": slos,
        "slo_scale": _SLO_SCALE.value, "duration_s": _DURATION.value, "trace": _TRACE.value,
        "arrival": _ARRIVAL.value, "cv": _CV.value, "seed": _SEED.value, "max_model_len": max_len,
        "cost_model": _PROFILES.value or "FineServe profiles (apex-cost, aws-cost)",
        "placement_s": t_place}
    metrics.check_conservation(summary)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plan.save(os.path.join(_OUT.value, "plan.json"))
    latency_plot(summary, result.records, os.path.join(_OUT.value, "latency.png"),
                 f"{summary['sim']['system']} (simulated)", log_x=True)
    print(metrics.format_table(summary))
    n_models = len(plan.model_names)
    print(f"simulated {plan.gpus_used} GPUs ({len(plan.devices)} devices), {n_models} models, "
          f"{len(requests)} requests, {result.duration_s:.1f} simulated s in {result.wall_s:.1f} s "
          f"wall ({result.steps} steps, {sim.workers or os.cpu_count()} worker(s); placement "
          f"{t_place:.1f} s)")
    print(f"wrote {_OUT.value}/summary.json, plan.json and latency.png")


if __name__ == "__main__":
    app.run(main)

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
FineServe profiles. With --trace, the trace's own arrivals and lengths are spread over the
fleet's models in proportion to their rates: the whole trace, unless a window is asked for
(--trace_start_s, --duration_s trace seconds, --num_requests); the script prints how many of
the trace's requests the window keeps.

Every flag is checked before any work (`experiments.flag_checks`): non-positive or NaN
rates, scales and durations, non-positive lengths, and synthetic workloads larger than
--max_workload_requests (estimated from rate x duration before generating) are usage errors.

Writes OUTPUT_DIR/summary.json (metrics.summarize + "kv" + "compile" + "placement" + "sim"),
OUTPUT_DIR/plan.json and OUTPUT_DIR/latency.png, and prints a table and the simulation time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags

from experiments.flag_checks import (
    DEFAULT_MAX_WORKLOAD_REQUESTS,
    check_simulate_flags,
    check_trace_window,
    usage,
)
from experiments import prefix_flags
from experiments.plots import latency_plot

_FLEET = flags.DEFINE_string("fleet", "mixed8", "fleet: pair8b | mixed8 | lmsys (fineserve_jax.sim.fleets)")
_SYSTEM = flags.DEFINE_string(
    "system", "fineserve", "system (placement + KV + scheduling): fineserve, muxserve, prism, "
    "spatial, fineserve-static, fineserve-rr, muxserve-slab")
_PLAN = flags.DEFINE_string("plan", None, "a placement plan JSON (skips placement; the system "
                            "still sets the KV mode and scheduling)")
_RATE_SCALE = flags.DEFINE_float("rate_scale", 1.0, "multiply every model's rate")
_DURATION = flags.DEFINE_float("duration_s", None, "workload length (s; default 300); with --trace, "
                               "the trace window (trace seconds; default: the whole trace)")
_NUM = flags.DEFINE_integer("num_requests", 0, "if > 0: exactly this many requests (with --trace: "
                            "at most this many from the window)")
_ARRIVAL = flags.DEFINE_enum("arrival", "poisson", ["poisson", "gamma"], "arrival process")
_CV = flags.DEFINE_float("cv", 1.0, "gamma arrivals: coefficient of variation")
_TRACE = flags.DEFINE_string("trace", None, "Azure LLM trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)")
_TRACE_START = flags.DEFINE_float("trace_start_s", 0.0, "trace window start (trace seconds)")
_TRACE_SCALE = flags.DEFINE_float("trace_time_scale", None, "compress trace time by this factor")
_TRACE_RATE = flags.DEFINE_float("trace_target_rate", None, "rescale the trace window to this rate")
_SLO_SCALE = flags.DEFINE_float("slo_scale", 40.0, "TTFT SLO = scale x TTFT(903-token prompt) + 4 ms")
_MAXLEN = flags.DEFINE_integer("max_model_len", None, "longest prompt + output (default 4096, or "
                               "16384 with --trace)")
_NODES = flags.DEFINE_integer("nodes", 0, "override the fleet's node count")
_GPUS = flags.DEFINE_integer("gpus_per_node", 0, "override the fleet's GPUs per node")
_MEM = flags.DEFINE_float("gpu_memory_gib", 0.0, "override GPU memory (GiB)")
_PROFILES = flags.DEFINE_list("profiles", [], "cost-model CSVs (default: the shared FineServe profiles)")
_WORKERS = flags.DEFINE_integer("workers", 2, "processes simulating devices in parallel (0: all CPUs)")
_SEED = flags.DEFINE_integer("seed", 0, "workload seed")
_MAX_REQ = flags.DEFINE_integer("max_workload_requests", DEFAULT_MAX_WORKLOAD_REQUESTS,
                                "refuse workloads with more requests than this (memory)")
_OUT = flags.DEFINE_string("output_dir", "runs/simulate", "where to write summary.json, plan.json, latency.png")
flags.adopt_module_key_flags(prefix_flags)  # --help lists the prefix-caching flags too


def with_workload_lengths(fleet, requests):
    """The fleet with each model's mean prompt/output lengths taken from its requests."""
    from fineserve_jax.cluster.routing import mean_lengths

    lens = mean_lengths(requests)
    ms = tuple(dataclasses.replace(m, prompt_len=lens[m.name][0], output_len=lens[m.name][1])
               if m.name in lens else m for m in fleet.models)
    return dataclasses.replace(fleet, models=ms)


def check_flags() -> None:
    check_simulate_flags(
        fleet=_FLEET.value, system=_SYSTEM.value, rate_scale=_RATE_SCALE.value,
        duration_s=_DURATION.value, num_requests=_NUM.value, cv=_CV.value, trace=_TRACE.value,
        trace_start_s=_TRACE_START.value, trace_time_scale=_TRACE_SCALE.value,
        trace_target_rate=_TRACE_RATE.value, slo_scale=_SLO_SCALE.value, max_model_len=_MAXLEN.value,
        nodes=_NODES.value, gpus_per_node=_GPUS.value, gpu_memory_gib=_MEM.value,
        workers=_WORKERS.value, max_workload_requests=_MAX_REQ.value)


def load_trace_window(path: str, start_s: float, duration_s, max_requests):
    """Read the trace and say which part of it is replayed (printed: a window never cuts a
    trace silently). -> the parsed trace (replay_trace takes it instead of the path)."""
    from fineserve_jax.workload.traces import TraceError, load_azure_trace

    try:
        trace = load_azure_trace(path)
    except TraceError as e:
        raise usage("trace", str(e)) from None
    win = trace.window(start_s, duration_s, max_requests)
    if len(win) == len(trace):
        print(f"trace {path}: replaying all {len(trace)} requests ({trace.duration_s:.1f} trace s)")
    else:
        end = f"{start_s + duration_s:g}" if duration_s is not None else "end"
        cap = f", at most {max_requests} requests" if max_requests else ""
        print(f"trace {path}: replaying the window [{start_s:g} s, {end}){cap}: {len(win)} of "
              f"{len(trace)} requests ({len(trace) - len(win)} left out; the trace spans "
              f"{trace.duration_s:.1f} s)")
    check_trace_window(len(win), _MAX_REQ.value)
    return trace


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    # The trace next (a bad file is named before the cost model and placement run).
    trace = (load_trace_window(_TRACE.value, _TRACE_START.value, _DURATION.value, _NUM.value or None)
             if _TRACE.value else None)
    from fineserve_jax import metrics
    from fineserve_jax.scheduler.footprint import GiB
    from fineserve_jax.scheduler.placement import PlacementConfig, place
    from fineserve_jax.scheduler.plan import PlacementPlan
    from fineserve_jax.sim import get_system, simulate
    from fineserve_jax.sim.fleets import fleet_workload, get_fleet
    from fineserve_jax.scheduler.cost import load_cost_model

    t0 = time.perf_counter()
    cost = load_cost_model(_PROFILES.value)
    system = get_system(_SYSTEM.value)
    fleet = get_fleet(_FLEET.value).scaled(_RATE_SCALE.value)
    over = {k: v for k, v in (("nodes", _NODES.value), ("gpus_per_node", _GPUS.value),
                              ("gpu_memory_bytes", int(_MEM.value * GiB))) if v}
    if over:
        fleet = fleet.with_cluster(**over)
    max_len = _MAXLEN.value or (16384 if _TRACE.value else 4096)
    if trace is not None:
        duration = _DURATION.value  # the trace window; None: the whole trace
    else:
        duration = None if _NUM.value else (_DURATION.value or 300.0)
    sharing = prefix_flags.prefix_sharing()
    if sharing is not None and trace is not None:
        raise app.UsageError("--shared_prefix_fraction / --session_turns apply to synthetic "
                             "workloads, not to --trace")
    requests = fleet_workload(
        fleet, duration_s=duration, num_requests=_NUM.value or None, arrival=_ARRIVAL.value, cv=_CV.value, seed=_SEED.value,
        trace=trace, trace_start_s=_TRACE_START.value, trace_time_scale=_TRACE_SCALE.value,
        trace_target_rate=_TRACE_RATE.value, prefixes=sharing)
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
    sim = dataclasses.replace(system.sim, workers=_WORKERS.value,
                              prefix_caching=prefix_flags.ENABLE_PREFIX_CACHING.value)
    result = simulate(plan, requests, cost, sim, system=system.name)
    summary = result.summary()
    summary["config"] = {
        "fleet": fleet.name, "system": system.name, "rate_scale": _RATE_SCALE.value,
        "rates": {m.name: m.rate for m in fleet.models}, "slo_ttft_s": slos,
        "slo_scale": _SLO_SCALE.value, "duration_s": duration, "trace": _TRACE.value,
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

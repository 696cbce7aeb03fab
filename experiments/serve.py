"""The main job: serve a mixed-precision multi-model workload on one device.

    python -m experiments.serve --output_dir=runs/serve
    python -m experiments.serve --plan=PLAN.json --device_id=D   # one device of a plan
    python -m experiments.serve --plan=PLAN.json --node=K        # every device of node K

With --node, one process serves every device group of the node (an engine per group on its
own devices, tensor-parallel where the group has several GPUs; requests routed by the
simulator's router; one thread per engine) and writes one summary.json for the node with a
section per device. On CPU, virtual devices stand in for the GPUs: start the process with
XLA_FLAGS=--xla_force_host_platform_device_count=N (N = the plan's GPUs per node).

Defaults run on a CPU in a few minutes: three tiny models of different families, presets
and KV dtypes sharing one KV arena, a seeded Poisson workload with per-model rates and TTFT
SLOs. Writes OUTPUT_DIR/summary.json (per-model and overall metrics, KV slab statistics,
compile counts) and OUTPUT_DIR/latency.png, and prints a table.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from experiments import prefix_flags
from experiments.plots import latency_plot

_MODELS = flags.DEFINE_list(
    "models", ["tiny-llama:org", "tiny-mistral:fp8_kv8", "tiny-qwen2:qoq"],
    "model:preset entries (a tiny preset or an HF checkpoint directory)")
_RATES = flags.DEFINE_list("rates", ["20", "10", "5"], "per-model request rates (req/s)")
_NUM = flags.DEFINE_integer("num_requests", 300, "requests in the workload (0: use --duration_s)")
_DURATION = flags.DEFINE_float("duration_s", 0.0, "workload length when --num_requests=0")
_ARRIVAL = flags.DEFINE_enum("arrival", "poisson", ["poisson", "gamma"], "arrival process")
_CV = flags.DEFINE_float("cv", 1.0, "coefficient of variation for gamma arrivals")
_PROMPT_MEAN = flags.DEFINE_float("prompt_mean", 64, "mean prompt tokens (lognormal)")
_OUTPUT_MEAN = flags.DEFINE_float("output_mean", 48, "mean output tokens (lognormal)")
_SLO_SCALE = flags.DEFINE_float(
    "slo_scale", 40.0, "TTFT SLO = scale x the profiled single-request TTFT of the P95 prompt "
    "+ 4 ms (FineServe's definition)")
_SLO = flags.DEFINE_list("slo_ttft_s", [], "explicit per-model TTFT SLOs (overrides --slo_scale)")
_ADMISSION = flags.DEFINE_enum("admission", "deadline", ["deadline", "fcfs", "shortest", "precision"],
                               "admission policy")
_EXECUTION = flags.DEFINE_enum("execution", "saab", ["saab", "round_robin", "fcfs"],
                               "execution policy")
_DROP = flags.DEFINE_boolean("drop", True, "drop requests whose SLO is unreachable (saab)")
_ARENA_MB = flags.DEFINE_float("arena_mb", 0.25, "KV arena size (MiB); small on purpose so memory flows between models")
_MAXLEN = flags.DEFINE_integer("max_model_len", 256, "longest prompt + output")
_TPB = flags.DEFINE_integer("tokens_per_block", 4, "tokens per KV block (small for tiny models, "
                            "so the small default arena still has many slabs)")
_IMPL = flags.DEFINE_string("attention_impl", "auto", "auto | reference | xla | cpu | pallas_triton")
_DTYPE = flags.DEFINE_string("dtype", "float32", "float32 | bfloat16")
_SEED = flags.DEFINE_integer("seed", 0, "workload and sampling seed")
_OUT = flags.DEFINE_string("output_dir", "runs/serve", "where to write summary.json and the plot")
_COMPACT = flags.DEFINE_integer(
    "compaction_interval", 16, "compact KV slabs every N steps while requests wait (0: off)")
_PLAN = flags.DEFINE_string(
    "plan", None, "a placement plan JSON (experiments.placement / experiments.simulate): serve "
    "the models, presets, rates and SLOs of one of its devices (real-size configs get random "
    "weights; the arena is the plan's unless --arena_mb is given)")
_DEVICE = flags.DEFINE_integer("device_id", 0, "which device of --plan to serve")
_DECODE_BUCKETS = flags.DEFINE_list(
    "decode_buckets", [], "decode batch-size buckets (default: the engine's)")
_PREFILL_BUCKETS = flags.DEFINE_list(
    "prefill_buckets", [], "prefill token-count buckets (default: the engine's)")
_NODE = flags.DEFINE_integer(
    "node", None, "serve every device group of this node of --plan from one process (one "
    "engine per group; --arena_mb, when given, is each GPU's arena)")
_CACHE = flags.DEFINE_string("compilation_cache_dir", "auto", "persistent XLA compilation cache folder (\"auto\": a per-user folder; empty: off)")
flags.adopt_module_key_flags(prefix_flags)  # --help lists the prefix-caching flags too


def _parse_models(entries):
    out = []
    for e in entries:
        name, _, preset = e.rpartition(":") if ":" in e else (e, "", "org")
        out.append((name, preset or "org"))
    return out


def build_requests(vocab_sizes, names, rates, num, duration, seed, slos):
    """The seeded workload of the flags for models `names` (vocab_sizes: name -> vocabulary)."""
    from fineserve_jax.core.request import Request
    from fineserve_jax.core.sampling_params import SamplingParams
    from fineserve_jax.workload import (LengthDist, ModelLoad, RequestLengths,
                                        generate_workload)

    maxlen = _MAXLEN.value
    lengths = RequestLengths(
        LengthDist.lognormal(_PROMPT_MEAN.value, 0.8, lo=4, hi=maxlen // 2),
        LengthDist.lognormal(_OUTPUT_MEAN.value, 0.8, lo=2, hi=maxlen // 2 - 1))
    loads = [ModelLoad(n, r, slos[n], lengths) for n, r in zip(names, rates)]
    sharing = prefix_flags.prefix_sharing(max_session_tokens=maxlen // 2)
    wl = generate_workload(loads, duration_s=duration or None, num_requests=num or None,
                           arrival=_ARRIVAL.value, cv=_CV.value, seed=seed, prefixes=sharing)
    reqs = []
    for w in wl:
        prompt = w.prompt_tokens(vocab_sizes[w.model])
        sp = SamplingParams(max_tokens=int(w.output_len), temperature=0.7, top_p=0.9,
                            seed=int(w.request_id), ignore_eos=True)
        reqs.append(Request(model=w.model, prompt=prompt, sampling=sp, arrival_s=w.arrival_s,
                            slo_ttft_s=w.slo_ttft_s, request_id=w.request_id))
    return reqs




def _served_models():
    """-> (names, presets, rates, engine model specs, SLOs or None, arena bytes, devices), from
    the flags or from one device of a placement plan (devices: its GPUs as local device
    indices when it is a tensor-parallel group, else None: the default device)."""
    from fineserve_jax.engine.device_engine import ModelSpec
    from fineserve_jax.loader import load_model

    arena = int(_ARENA_MB.value * (1 << 20))
    if _PLAN.value:
        from fineserve_jax.scheduler.plan import PlacementPlan

        plan = PlacementPlan.load(_PLAN.value)
        dev = next((d for d in plan.devices if d.id == _DEVICE.value), None)
        if dev is None:
            raise app.UsageError(f"--device_id={_DEVICE.value} is not in {_PLAN.value} (devices "
                                 f"{[d.id for d in plan.devices]})")
        ms = dev.models
        specs = [ModelSpec(m.name, load_model(m.config, quant=m.preset, dtype=_DTYPE.value,
                                              seed=_SEED.value, random_weights=True), m.preset)
                 for m in ms]
        slos = ({m.name: m.slo_ttft_s for m in ms} if all(m.slo_ttft_s for m in ms) else None)
        devices = None
        if dev.tp > 1:
            from fineserve_jax.cluster.topology import local_gpus

            devices = list(local_gpus(plan, dev))
        if not flags.FLAGS["arena_mb"].present:
            arena = int(dev.kv_arena_bytes) // dev.tp  # the plan's arena is the whole group's
        return ([m.name for m in ms], [m.preset for m in ms], [m.rate for m in ms], specs,
                slos, arena, devices)
    models = _parse_models(_MODELS.value)
    names = [f"{m.split('/')[-1]}:{p}" for m, p in models]
    rates = [float(r) for r in _RATES.value]
    if len(rates) != len(models):
        raise app.UsageError(f"--rates has {len(rates)} entries for {len(models)} models")
    specs = [ModelSpec(n, m, p) for n, (m, p) in zip(names, models)]
    return names, [p for _, p in models], rates, specs, None, arena, None


def _engine_kwargs():
    """Engine options of the flags (shared by the one-device and the node paths)."""
    import dataclasses

    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.scheduler.local import SchedulerConfig

    buckets = Buckets()
    if _DECODE_BUCKETS.value:
        buckets = dataclasses.replace(buckets, decode_sizes=tuple(int(x) for x in _DECODE_BUCKETS.value))
    if _PREFILL_BUCKETS.value:
        buckets = dataclasses.replace(buckets, prefill_sizes=tuple(int(x) for x in _PREFILL_BUCKETS.value))
    return dict(buckets=buckets, max_model_len=_MAXLEN.value, tokens_per_block=_TPB.value, slab_target_bytes=1,
                scheduler=SchedulerConfig(admission=_ADMISSION.value, execution=_EXECUTION.value,
                                          drop=_DROP.value),
                attention_impl=_IMPL.value, dtype=_DTYPE.value, seed=_SEED.value,
                compilation_cache_dir=_CACHE.value, compaction_interval=_COMPACT.value,
                enable_prefix_caching=prefix_flags.ENABLE_PREFIX_CACHING.value)


def plan_vocab_sizes(plan):
    """model name -> vocabulary size of its plan config."""
    from models.presets import ALL

    return {n: ALL[v[0][1].config].vocab_size for n, v in plan.instances().items()}


def workload_slos(names, plan_slos, prefill_time):
    """Per-model TTFT SLOs: --slo_ttft_s, else the plan's, else --slo_scale x the profiled
    TTFT of the P95 prompt (`prefill_time(name, tokens)`) + 4 ms."""
    if _SLO.value:
        return dict(zip(names, (float(s) for s in _SLO.value)))
    if plan_slos:
        return dict(plan_slos)
    p95 = int(min(_MAXLEN.value // 2, _PROMPT_MEAN.value * 3))
    return {n: _SLO_SCALE.value * prefill_time(n, p95) + 0.004 for n in names}


def write_outputs(summary, records, title: str) -> None:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    latency_plot(summary, records, os.path.join(_OUT.value, "latency.png"), title)
    from fineserve_jax import metrics

    print(metrics.format_table(summary))
    print(f"wrote {_OUT.value}/summary.json and {_OUT.value}/latency.png")


def serve_node(plan_path: str, node: int) -> dict:
    """--plan --node: every device group of the node from this process; returns the summary."""
    from fineserve_jax.cluster.node import NodeServer
    from fineserve_jax.cluster.topology import node_plan
    from fineserve_jax.scheduler.plan import PlacementPlan

    plan = PlacementPlan.load(plan_path)
    try:
        scope = node_plan(plan, node)
    except ValueError as e:
        raise app.UsageError(f"--node={node}: {e}") from None
    arena = int(_ARENA_MB.value * (1 << 20)) if flags.FLAGS["arena_mb"].present else None
    print(f"node {node}: {len(scope.devices)} device groups on {scope.gpus_used} GPUs; loading "
          f"and compiling ...", flush=True)
    server = NodeServer(plan, node, engine_kwargs=_engine_kwargs(), arena_bytes_per_gpu=arena,
                        dtype=_DTYPE.value, seed=_SEED.value, log=print)
    print(f"ready in {server.startup_s:.1f}s: {server.warmup_compiles} compiles")
    names = scope.model_names
    rates = scope.model_rates()
    plan_slos = scope.model_slos()

    def prefill_time(n, tokens):
        return max(e.cost.prefill_time(n, tokens) for e in server.engines.values() if n in e.models)

    slos = workload_slos(names, plan_slos if all(plan_slos.values()) else None, prefill_time)
    reqs = build_requests(plan_vocab_sizes(scope), names, [rates[n] for n in names], _NUM.value,
                          _DURATION.value, _SEED.value, slos)
    result = server.serve(reqs)
    config = {"models": scope.model_presets(), "plan": plan_path, "node": node,
              "rates": rates, "slo_ttft_s": slos, "admission": _ADMISSION.value,
              "execution": _EXECUTION.value, "attention_impl": _IMPL.value, "seed": _SEED.value,
              "steps": sum(e.num_steps for e in server.engines.values())}
    summary = result.summary(config)
    assert len(result.ended) == len(reqs)
    write_outputs(summary, result.records, f"serve node {node}")
    n = summary["node"]
    print(f"node {node}: {n['devices']} devices, {n['gpus']} GPUs, wall {n['wall_s']:.2f}s, "
          f"step time summed over devices {n['busy_s']:.2f}s (overlap {n['overlap']:.2f}x); "
          f"compiles: warm-up {summary['compile']['warmup_compiles']}, after warm-up "
          f"{summary['compile']['steady_state_compiles']}")
    return summary


def main(argv):
    del argv
    from fineserve_jax import metrics
    from fineserve_jax.engine.device_engine import Engine

    if _NODE.value is not None:
        if not _PLAN.value:
            raise app.UsageError("--node needs --plan")
        serve_node(_PLAN.value, _NODE.value)
        return
    names, presets, rates, specs, plan_slos, arena_bytes, devices = _served_models()
    print(f"loading {len(specs)} models and compiling their steps ...", flush=True)
    t0 = time.perf_counter()
    engine = Engine(specs, arena_bytes=arena_bytes, devices=devices, **_engine_kwargs())
    print(f"ready in {time.perf_counter() - t0:.1f}s: {engine.warmup_compiles} compiles, "
          f"arena {engine.num_slabs} slabs x {engine.slab_bytes} B, attention {engine.impl}")
    slos = workload_slos(names, plan_slos, engine.cost.prefill_time)
    reqs = build_requests({n: engine.models[n].config.vocab_size for n in names}, names, rates,
                          _NUM.value, _DURATION.value, _SEED.value, slos)
    outputs = engine.run(reqs, realtime=True, progress=True)
    duration = engine.now()
    records = engine.records()
    summary = metrics.summarize(
        records, duration_s=duration, kv_samples=engine.kv_samples,
        presets=dict(zip(names, presets)), models=names,
        kv_arena_bytes=engine.num_slabs * engine.slab_bytes, kv_slab_bytes=engine.slab_bytes)
    summary["kv"]["num_slabs"] = engine.num_slabs
    summary["kv"]["preemptions"] = engine.scheduler.num_preemptions
    summary["kv"]["compaction"] = dict(engine.compaction_stats)
    summary["prefix_cache"] = metrics.prefix_cache_summary(engine.scheduler.prefix_cache_stats(),
                                                          records)
    summary["compile"] = {"warmup_compiles": engine.warmup_compiles,
                          "steady_state_compiles": engine.steady_state_compiles,
                          "warmup_s": engine.warmup_s}
    summary["config"] = {"models": dict(zip(names, presets)), "plan": _PLAN.value,
                         "rates": dict(zip(names, rates)), "slo_ttft_s": slos,
                         "admission": _ADMISSION.value, "execution": _EXECUTION.value,
                         "attention_impl": engine.impl, "seed": _SEED.value,
                         "steps": engine.num_steps}
    metrics.check_conservation(summary)
    assert len(outputs) == len(reqs)
    write_outputs(summary, records, "serve")
    print(f"compiles: warm-up {engine.warmup_compiles}, after warm-up "
          f"{engine.steady_state_compiles}; preemptions {engine.scheduler.num_preemptions}")


if __name__ == "__main__":
    app.run(main)

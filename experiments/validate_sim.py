"""Validate the simulator against the engine: the same tiny-model workload is served for real
(CPU here, a GPU when lent) and simulated, in two ways:

  --replay   the simulator runs the served requests through the same device loop with the
             engine's recorded step durations and clock readings (`sim.replay`): every
             request must end the same way with the same tokens at the same time (a logic
             check: serving and simulating are one code). Writes OUTPUT_DIR/replay.json with
             `requests`, `identical_outcomes` and `max_ttft_diff_ms`.
  (always)   the simulator runs the same requests with step times from a cost model fitted
             to this machine's own profile; the error of its median TTFT and TPOT is the
             cost model's (OUTPUT_DIR/validation.json).

    python -m experiments.validate_sim --replay --output_dir=runs/validate
    python -m experiments.validate_sim --profile_csv=runs/profile/cpu-tiny.csv  # reuse a profile

Steps: (1) build the engine (experiments.serve's default models, arena and buckets; the same
scheduler as serve: deadline admission + saab); (2) profile it with experiments.profile (or
read --profile_csv) and fit `CostModel.from_csv`; (3) serve a seeded Poisson workload in real
time; (4) simulate the same requests on a one-device plan that mirrors the engine (same models
and presets, arena bytes, slab size, tokens per block, step limits = the bucket limits, steps
charged at their padded bucket size, the profile's first-step-after-idle penalty, same
scheduler configuration and SLOs); (5) compare. Writes OUTPUT_DIR/validation.json,
OUTPUT_DIR/profile.csv (when profiled) and OUTPUT_DIR/ttft_tpot.png.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import json
import os
import statistics
import time

import numpy as np
from absl import app, flags

from experiments import profile as prof  # shares its flags: --models, --batch_sizes,
# --input_lens, --reps, --arena_mb, --max_model_len, --attention_impl, --dtype, --seed

_RATES = flags.DEFINE_list("rates", ["6", "3", "1.5"], "per-model request rates (req/s)")
_NUM = flags.DEFINE_integer("num_requests", 200, "requests in the workload")
_PROMPT_MEAN = flags.DEFINE_float("prompt_mean", 48, "mean prompt tokens (lognormal)")
_OUTPUT_MEAN = flags.DEFINE_float("output_mean", 40, "mean output tokens (lognormal)")
_SLO_SCALE = flags.DEFINE_float("slo_scale", 40.0, "TTFT SLO = scale x profiled TTFT of the P95 prompt + 4 ms")
_PROFILE = flags.DEFINE_string("profile_csv", None, "use this profile instead of measuring one")
_WAKEUP = flags.DEFINE_boolean("wakeup", True, "charge the profile's measured first-step-after-idle "
                               "penalty in the simulation (SimConfig.wakeup_s)")
_OUT = flags.DEFINE_string("output_dir", "runs/validate", "where to write validation.json")
_REPLAY = flags.DEFINE_boolean("replay", False, "also replay the served run in the simulator "
                               "with its recorded step times and write replay.json")
_TIGHT = flags.DEFINE_float("tight_slo_fraction", 0.2, "fraction of requests whose TTFT SLO is "
                            "tight (2x their own prefill time): some are dropped under load")
_TPB = flags.DEFINE_integer("tokens_per_block", 4, "KV tokens per block")
# A small arena by default, so that memory runs out and requests are preempted.
flags.FLAGS.set_default("arena_mb", 0.12)


def rel_err(sim, real):
    return None if sim is None or not real else (sim - real) / real


def stats(records, model=None):
    fin = [r for r in records if r.status == "finished" and (model is None or r.model == model)]
    ttft = [r.ttft_s for r in fin]
    tpot = [r.tpot_s for r in fin if r.tpot_s is not None]
    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    p90 = lambda v: float(np.percentile(v, 90)) if v else None  # noqa: E731
    return {"finished": len(fin), "ttft_p50_s": med(ttft), "ttft_p90_s": p90(ttft),
            "tpot_p50_s": med(tpot), "tpot_p90_s": p90(tpot),
            "dropped": sum(1 for r in records if r.status == "dropped" and (model is None or r.model == model))}


def first_step_split(records, step_starts):
    """Median (wait, step) of each request's TTFT, split at the start of the step that produced
    its first token: the wait is queueing plus the engine loop's reaction (sleep wake-up,
    arrivals taken in between steps), the step is the prefill itself."""
    waits, steps = [], []
    for r in records:
        if r.first_token_s is None:
            continue
        i = bisect.bisect_right(step_starts, r.first_token_s) - 1
        if i >= 0 and step_starts[i] >= r.arrival_s:
            waits.append(step_starts[i] - r.arrival_s)
            steps.append(r.first_token_s - step_starts[i])
    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    return {"wait_p50_s": med(waits), "prefill_step_p50_s": med(steps)}


def plot(real, sim, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, attr, title in ((axes[0], "ttft_s", "TTFT"), (axes[1], "tpot_s", "TPOT")):
        for recs, label in ((real, "engine (measured)"), (sim, "simulator")):
            v = sorted(getattr(r, attr) for r in recs if r.status == "finished" and getattr(r, attr) is not None)
            if v:
                ax.plot(np.array(v) * 1e3, np.arange(1, len(v) + 1) / len(v), label=label)
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("CDF")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replay_run(engine, sched, cost_at_start, reqs, served, readings, steps, preemptions):
    """The served run again in the simulator's device loop, with the recorded step times and
    clock readings; writes replay.json."""
    from fineserve_jax.core.clock import ReplayClock
    from fineserve_jax.core.loop import DeviceLoop
    from fineserve_jax.kvslab import SlabAllocator
    from fineserve_jax.scheduler.local import LocalScheduler
    from fineserve_jax.sim.replay import ReplayExecutor, compare_runs

    t0 = time.perf_counter()
    scheduler = LocalScheduler(dict(engine.scheduler.models),
                               SlabAllocator(engine.num_slabs, engine.slab_bytes),
                               cost_at_start, dataclasses.replace(sched))
    executor = ReplayExecutor(steps, lambda p: engine.buckets.bucket(p.kind, p.size))
    sim = DeviceLoop(scheduler, executor, ReplayClock(readings), config=engine.loop.config)
    replayed = sim.run(reqs, realtime=True)
    cmp = compare_runs(served, replayed)
    out = {**cmp.as_dict(), "steps": len(steps), "preemptions": preemptions,
           "replay_preemptions": scheduler.num_preemptions, "wall_s": time.perf_counter() - t0}
    with open(os.path.join(_OUT.value, "replay.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"replay: {cmp.requests} requests ({cmp.outcomes}), {len(steps)} steps, "
          f"{preemptions} preemptions: identical outcomes {cmp.identical_outcomes}, "
          f"max TTFT difference {cmp.max_ttft_diff_ms} ms")
    return out


def main(argv):
    del argv
    import jax

    from fineserve_jax.core.clock import RecordingClock
    from fineserve_jax.core.request import Request
    from fineserve_jax.core.sampling_params import SamplingParams
    from fineserve_jax.scheduler.cost import CostModel
    from fineserve_jax.scheduler.footprint import GiB, footprint
    from fineserve_jax.scheduler.local import SchedulerConfig
    from fineserve_jax.scheduler.plan import ClusterSpec, PlacedModel, PlacementPlan, make_device
    from fineserve_jax.sim import SimConfig, simulate
    from fineserve_jax.workload import LengthDist, ModelLoad, RequestLengths, generate_workload

    os.makedirs(_OUT.value, exist_ok=True)
    models = prof.parse_models(prof._MODELS.value)
    rates = [float(r) for r in _RATES.value]
    if len(rates) != len(models):
        raise app.UsageError(f"--rates has {len(rates)} entries for {len(models)} models")
    sched = SchedulerConfig()  # experiments.serve's defaults: deadline + saab + drop
    t0 = time.perf_counter()
    engine = prof.build_engine(models, prof._ARENA_MB.value, prof._MAXLEN.value, prof._IMPL.value,
                               prof._DTYPE.value, prof._SEED.value, scheduler=sched,
                               tokens_per_block=_TPB.value)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s on {jax.default_backend()}")

    # (2) the cost model from this machine's profile
    csv_path = _PROFILE.value
    if not csv_path:
        rows = prof.profile_engine(engine, models, [int(x) for x in prof._BATCH.value],
                                   [int(x) for x in prof._INPUT.value], prof._OUTPUT_LEN.value,
                                   prof._REPS.value, prof._SEED.value)
        csv_path = os.path.join(_OUT.value, "profile.csv")
        prof.write_csv(rows, csv_path)
        if prof._WAKEUP_IDLE.value > 0:
            wake = prof.measure_wakeup(engine, models, min(int(x) for x in prof._INPUT.value),
                                       prof._OUTPUT_LEN.value, max(prof._REPS.value, 5),
                                       prof._WAKEUP_IDLE.value, prof._SEED.value)
            with open(prof.wakeup_path(csv_path), "w") as f:
                json.dump({"idle_s": prof._WAKEUP_IDLE.value, "wakeup_s": wake}, f, indent=2)
    cost = CostModel.from_csv(csv_path)
    wakeup_s = 0.0  # one device, one number: the mean over its models
    if _WAKEUP.value and os.path.exists(prof.wakeup_path(csv_path)):
        with open(prof.wakeup_path(csv_path)) as f:
            w = json.load(f)["wakeup_s"]
        wakeup_s = statistics.fmean(w.values()) if w else 0.0

    # (3) the workload, served for real
    maxlen = prof._MAXLEN.value
    lengths = RequestLengths(LengthDist.lognormal(_PROMPT_MEAN.value, 0.8, lo=4, hi=maxlen // 2),
                             LengthDist.lognormal(_OUTPUT_MEAN.value, 0.8, lo=2, hi=maxlen // 2 - 1))
    p95 = int(min(maxlen // 2, _PROMPT_MEAN.value * 3))
    slos = {n: _SLO_SCALE.value * cost.prefill_time(c, p, p95, 1, 0, 1) + 0.004 for n, c, p in models}
    loads = [ModelLoad(n, r, slos[n], lengths) for (n, _, _), r in zip(models, rates)]
    wl = generate_workload(loads, num_requests=_NUM.value, seed=prof._SEED.value)
    rng = np.random.default_rng(prof._SEED.value + 1)
    # A fraction of requests gets a tight SLO (twice its own prefill), so some are dropped.
    tight = rng.random(len(wl)) < _TIGHT.value
    wl = [dataclasses.replace(w, slo_ttft_s=2.0 * engine.cost.prefill_time(w.model, w.prompt_len))
          if t else w for w, t in zip(wl, tight)]
    reqs = [Request(model=w.model, prompt=[1] + rng.integers(3, 259, size=w.prompt_len - 1).tolist(),
                    sampling=SamplingParams(max_tokens=int(w.output_len), ignore_eos=True),
                    arrival_s=w.arrival_s, slo_ttft_s=w.slo_ttft_s, request_id=w.request_id) for w in wl]
    ids = {w.request_id for w in wl}
    t1 = time.perf_counter()
    kv0 = len(engine.kv_samples)
    loop = engine.loop
    recording = RecordingClock(loop.clock)
    cost_at_start = copy.deepcopy(engine.cost)
    loop.clock, loop.step_log = recording, []
    preempt0 = engine.scheduler.num_preemptions
    try:
        engine.run(reqs, realtime=True)
    finally:
        loop.clock = recording.inner
    steps, loop.step_log = loop.step_log, None
    served = [loop.states[r.request_id] for r in reqs]
    real = [r for r in engine.records() if r.request_id in ids]
    split = first_step_split(real, sorted(t for t, *_ in engine.kv_samples[kv0:]))  # step starts
    print(f"served {len(real)} requests in {time.perf_counter() - t1:.1f} s "
          f"({engine.scheduler.num_preemptions - preempt0} preemptions)")
    if _REPLAY.value:
        replay_run(engine, sched, cost_at_start, reqs, served, recording.readings, steps,
                   engine.scheduler.num_preemptions - preempt0)

    # (4) the same requests, simulated on a plan that mirrors the engine
    arena = engine.num_slabs * engine.slab_bytes
    placed = []
    for n, c, p in models:
        fp = footprint(c, p, engine.tokens_per_block)
        placed.append(PlacedModel(n, c, p, rates[len(placed)], slos[n], fp.weight_bytes,
                                  fp.min_kv_bytes(maxlen)))
    cluster = ClusterSpec(1, 1, gpu_memory_bytes=16 * GiB)
    plan = PlacementPlan(cluster, (make_device(0, [0], placed, cluster, kv_arena_bytes=arena),),
                         "engine-mirror", max_model_len=maxlen, tokens_per_block=engine.tokens_per_block)
    b = engine.buckets
    cfg = SimConfig(scheduler=dataclasses.replace(sched), kv="slab", slab_bytes=engine.slab_bytes,
                    max_prefill_tokens=b.max_prefill, max_prefill_seqs=b.prefill_seqs,
                    max_decode_seqs=b.max_decode, prefill_buckets=tuple(b.prefill_sizes),
                    decode_buckets=tuple(b.decode_sizes), wakeup_s=wakeup_s, workers=1)
    # The mirror is the engine's own device, not a placement: the placement memory rule
    # (room for a whole max-length sequence per model) does not apply to its tiny arena.
    res = simulate(plan, wl, cost, cfg, system="engine-mirror", check=False)
    sim = res.records

    # (5) compare
    out = {"backend": jax.default_backend(), "profile_csv": csv_path, "num_requests": len(wl),
           "sim_wakeup_s": wakeup_s,
           "overall": {"engine": stats(real), "sim": stats(sim)}, "models": {}}
    for n, _, _ in models:
        out["models"][n] = {"engine": stats(real, n), "sim": stats(sim, n)}
    for block in [out["overall"], *out["models"].values()]:
        e, s = block["engine"], block["sim"]
        block["error"] = {k: rel_err(s[k], e[k]) for k in ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s")}
    out["engine_ttft_split"] = split
    out["fit"] = cost.fit_report()
    with open(os.path.join(_OUT.value, "validation.json"), "w") as f:
        json.dump(out, f, indent=2)
    plot(real, sim, os.path.join(_OUT.value, "ttft_tpot.png"))

    def ms(x):
        return "-" if x is None else f"{x * 1e3:8.2f}"

    def pct(x):
        return "-" if x is None else f"{x * 100:+6.1f}%"

    print(f"{'':<22} {'TTFT p50 ms':>24} {'TPOT p50 ms':>24}")
    print(f"{'':<22} {'engine':>8} {'sim':>8} {'err':>7} {'engine':>8} {'sim':>8} {'err':>7}")
    for name, block in [("overall", out["overall"]), *out["models"].items()]:
        e, s, er = block["engine"], block["sim"], block["error"]
        print(f"{name:<22} {ms(e['ttft_p50_s'])} {ms(s['ttft_p50_s'])} {pct(er['ttft_p50_s'])} "
              f"{ms(e['tpot_p50_s'])} {ms(s['tpot_p50_s'])} {pct(er['tpot_p50_s'])}")
    print(f"engine TTFT split (medians): wait for the first step {ms(split['wait_p50_s'])} ms, "
          f"prefill step {ms(split['prefill_step_p50_s'])} ms")
    print(f"wrote {_OUT.value}/validation.json and ttft_tpot.png")


if __name__ == "__main__":
    app.run(main)

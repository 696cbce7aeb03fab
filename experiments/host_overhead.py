"""Host overhead per engine iteration: scheduler + allocator + batch building, with the
device step replaced by a no-op (constant tokens), at 256 running requests over 4 models.

    python -m experiments.host_overhead --output_dir=runs/host_overhead
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags


def define_flags():
    """Flags are defined only when run as a script, so tests can import `measure`."""
    global _RUNNING, _MODELS, _ITERS, _OUT
    _RUNNING = flags.DEFINE_integer("running", 256, "requests kept running")
    _MODELS = flags.DEFINE_integer("models", 4, "models on the device")
    _ITERS = flags.DEFINE_integer("iters", 2000, "iterations to time")
    _OUT = flags.DEFINE_string("output_dir", "runs/host_overhead", "where to write the JSON")


def measure(running=256, num_models=4, iters=2000, seed=0):
    from fineserve_jax.engine.buckets import Buckets
    from fineserve_jax.core.request import RequestState
    from fineserve_jax.core.sampling_params import SamplingParams
    from fineserve_jax.engine.step_inputs import build_decode, build_prefill
    from fineserve_jax.formats import KVFormat
    from fineserve_jax.kvslab import SlabAllocator, choose_slab_bytes
    from fineserve_jax.scheduler.execution import ModelLimits
    from fineserve_jax.scheduler.local import LocalScheduler, ModelEntry, SchedulerConfig
    from fineserve_jax.scheduler.step_cost import BucketProfile

    per_model = running // num_models
    buckets = Buckets(decode_sizes=tuple(sorted({1, 8, 16, 32, per_model})), prefill_sizes=(64, 256, 512),
                      prefill_seqs=8, table_width=128)
    dtypes = ["bf16", "fp8", "int8", "int4"]
    fmts = {f"m{i}": KVFormat(32, 8, 128, dtypes[i % 4], 16) for i in range(num_models)}
    slab = choose_slab_bytes([f.block_bytes for f in fmts.values()], max_lcm_factor=1e9).slab_bytes
    # Enough KV for every request at its longest (768 tokens): memory is not the question here.
    need = running * 48 * max(f.block_bytes for f in fmts.values())
    alloc = SlabAllocator(num_slabs=-(-need // slab) + 2 * num_models + 1, slab_bytes=slab)
    cost = BucketProfile()
    for m in fmts:
        for n in buckets.prefill_sizes:
            cost.set(m, "prefill", n, 1e-4 * n)
        for n in buckets.decode_sizes:
            cost.set(m, "decode", n, 0.01)
    entries = {m: ModelEntry(m, ["org", "fp8_kv8", "int8_kv8", "qoq"][i % 4], f.block_bytes, 16,
                             ModelLimits(buckets.max_prefill, buckets.prefill_seqs, per_model))
               for i, (m, f) in enumerate(fmts.items())}
    sched = LocalScheduler(entries, alloc, cost, SchedulerConfig())
    rng = np.random.default_rng(seed)
    next_id = 0

    def new_request(model):
        nonlocal next_id
        next_id += 1
        return RequestState(request_id=next_id, model=model,
                            prompt_token_ids=rng.integers(3, 1000, int(rng.integers(32, 256))).tolist(),
                            sampling=SamplingParams(max_tokens=int(rng.integers(64, 512)), ignore_eos=True),
                            arrival_s=0.0, slo_ttft_s=None)

    for i in range(running):
        sched.add(new_request(f"m{i % num_models}"))
    now, times, kinds, batch_sizes = 0.0, [], [], []
    for it in range(iters + 400):
        t0 = time.perf_counter()
        out = sched.schedule(now)
        p = out.step
        if p.kind == "prefill":
            x = build_prefill(p.seqs, p.chunks, buckets.prefill_bucket(p.num_tokens),
                              buckets.prefill_seqs, buckets.table_width, 16)
        else:
            x = build_decode(p.seqs, buckets.decode_bucket(len(p.seqs)), buckets.table_width, 16)
        tokens = x.tokens[: len(p.seqs)]  # the no-op "device step"
        now += 0.01
        done = sched.on_step_done(p, tokens.tolist(), now)
        for s in done:  # keep `running` requests in the system
            sched.add(new_request(s.model))
        dt = time.perf_counter() - t0
        if it >= 400:  # the first iterations prefill everything: warm-up
            times.append(dt)
            kinds.append(p.kind)
            batch_sizes.append(len(p.seqs))
    t = np.array(times) * 1e3
    dec = t[np.array(kinds) == "decode"]
    sizes = np.array(batch_sizes)
    running_now = sum(len(v) for v in sched.running.values())
    return {"running_requests": running_now, "models": num_models, "iterations": len(t),
            "mean_ms": float(t.mean()), "p50_ms": float(np.median(t)),
            "p99_ms": float(np.percentile(t, 99)),
            "decode_mean_ms": float(dec.mean()) if dec.size else None,
            "decode_fraction": float(dec.size / t.size),
            "mean_decode_batch": float(sizes[np.array(kinds) == "decode"].mean()) if dec.size else None}


def main(argv):
    del argv
    r = measure(_RUNNING.value, _MODELS.value, _ITERS.value)
    print(f"host overhead per iteration ({r['running_requests']} running requests, "
          f"{r['models']} models, {r['iterations']} iterations, device step = no-op):")
    print(f"  mean {r['mean_ms']:.3f} ms   p50 {r['p50_ms']:.3f} ms   p99 {r['p99_ms']:.3f} ms   "
          f"(decode steps: mean {r['decode_mean_ms']:.3f} ms, {r['decode_fraction']:.0%} of steps, "
          f"mean batch {r['mean_decode_batch']:.1f})")
    print("  target: < 1 ms per iteration:", "met" if r["mean_ms"] < 1.0 else "MISSED")
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "host_overhead.json"), "w") as f:
        json.dump(r, f, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main)

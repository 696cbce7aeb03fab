"""Host overhead per engine iteration: one iteration of the device loop (arrivals, scheduler,
allocator, batch building, token bookkeeping, KV sampling) with the device step replaced by a
no-op, at 256 running requests over 4 models.

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
    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.core.clock import VirtualClock
    from fineserve_jax.core.executor import FixedCostExecutor
    from fineserve_jax.core.loop import DeviceLoop
    from fineserve_jax.core.model_entry import ModelEntry, ModelLimits
    from fineserve_jax.core.request import Request
    from fineserve_jax.core.sampling_params import SamplingParams
    from fineserve_jax.core.step_plan import StepResult
    from fineserve_jax.engine.step_inputs import build_decode, build_prefill
    from fineserve_jax.formats import KVFormat
    from fineserve_jax.kvslab import SlabAllocator, device_slab_bytes
    from fineserve_jax.scheduler.local import LocalScheduler, SchedulerConfig
    from fineserve_jax.scheduler.step_cost import BucketProfile

    per_model = running // num_models
    buckets = Buckets(decode_sizes=tuple(sorted({1, 8, 16, 32, per_model})), prefill_sizes=(64, 256, 512),
                      prefill_seqs=8, table_width=128)

    class BatchBuildingExecutor(FixedCostExecutor):
        """The engine's host work for a step (bucket choice + batch building); the device
        step itself is a no-op that returns the input tokens."""

        def run(self, plan, while_running):
            size = buckets.bucket(plan.kind, plan.size)
            if plan.kind == "prefill":
                x = build_prefill(plan.seqs, plan.chunks, size, buckets.prefill_seqs,
                                  buckets.table_width, 16)
            else:
                x = build_decode(plan.seqs, size, buckets.table_width, 16)
            while_running()
            return StepResult(x.tokens[: len(plan.seqs)].tolist(), 0.01, size)

    dtypes = ["bf16", "fp8", "int8", "int4"]
    fmts = {f"m{i}": KVFormat(32, 8, 128, dtypes[i % 4], 16) for i in range(num_models)}
    slab = device_slab_bytes([f.block_bytes for f in fmts.values()], 1)
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
    loop = DeviceLoop(sched, BatchBuildingExecutor(), VirtualClock())
    rng = np.random.default_rng(seed)
    next_id = 0

    def new_request(model):
        nonlocal next_id
        next_id += 1
        return Request(model, rng.integers(3, 1000, int(rng.integers(32, 256))).tolist(),
                       SamplingParams(max_tokens=int(rng.integers(64, 512)), ignore_eos=True),
                       arrival_s=loop.clock.now(), request_id=next_id)

    for i in range(running):
        loop.submit(new_request(f"m{i % num_models}"))
    times, kinds, batch_sizes = [], [], []
    log = loop.step_log = []
    for it in range(iters + 400):
        ended = len(loop.ended)
        t0 = time.perf_counter()
        loop.step()
        dt = time.perf_counter() - t0
        for s in loop.ended[ended:]:  # keep `running` requests in the system
            loop.submit(new_request(s.model))
        if it >= 400:  # the first iterations prefill everything: warm-up
            times.append(dt)
            kinds.append(log[-1].kind)
            batch_sizes.append(log[-1].bucket)
    t = np.array(times) * 1e3
    dec = t[np.array(kinds) == "decode"]
    sizes = np.array(batch_sizes)
    return {"running_requests": sched.num_running, "models": num_models, "iterations": len(t),
            "mean_ms": float(t.mean()), "p50_ms": float(np.median(t)),
            "p99_ms": float(np.percentile(t, 99)),
            "decode_mean_ms": float(dec.mean()) if dec.size else None,
            "decode_fraction": float(dec.size / t.size),
            "mean_decode_bucket": float(sizes[np.array(kinds) == "decode"].mean()) if dec.size else None}


def main(argv):
    del argv
    r = measure(_RUNNING.value, _MODELS.value, _ITERS.value)
    print(f"host overhead per iteration ({r['running_requests']} running requests, "
          f"{r['models']} models, {r['iterations']} iterations, device step = no-op):")
    print(f"  mean {r['mean_ms']:.3f} ms   p50 {r['p50_ms']:.3f} ms   p99 {r['p99_ms']:.3f} ms   "
          f"(decode steps: mean {r['decode_mean_ms']:.3f} ms, {r['decode_fraction']:.0%} of steps, "
          f"mean decode bucket {r['mean_decode_bucket']:.1f})")
    print("  target: < 1 ms per iteration:", "met" if r["mean_ms"] < 1.0 else "MISSED")
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "host_overhead.json"), "w") as f:
        json.dump(r, f, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main)

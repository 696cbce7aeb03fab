"""Prefix caching, measured side by side on one engine (cache off vs on, alternating runs).

    python -m experiments.prefix_cache_bench --output_dir=runs/prefix_cache

Three workloads of tiny models of mixed presets, each served with the cache off and on in
the same process (the engine is compiled once; `Engine.reconfigure` switches the cache):
  shared     80% of requests start with one of their model's 256-token system prompts:
             median TTFT and output tokens/s, off vs on, and the outputs compared token by
             token (greedy).
  unique     no shared prefixes: output tokens/s, on / off (the cache's tax).
  pressure   shared prefixes on a small arena with two KV formats: slabs that went back to
             the pool and were formatted for another format (memory moving between
             formats), evictions, preemptions, off vs on.
All requests of a run are queued at once (offline batch), so TTFT is queueing plus prefill.
Prints a table and writes OUTPUT_DIR/prefix_cache.json.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

from experiments.output import write_json

_MODELS = flags.DEFINE_list("models", ["tiny-llama:org", "tiny-qwen2:qoq", "tiny-mistral:fp8_kv8"],
                            "model:preset entries")
_NUM = flags.DEFINE_integer("num_requests", 96, "requests per run")
_FRACTION = flags.DEFINE_float("shared_fraction", 0.8, "share of requests with a system prompt")
_PREFIX = flags.DEFINE_integer("prefix_len", 256, "system prompt tokens")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "each request's own prompt tokens")
_OUTPUT = flags.DEFINE_integer("output_len", 16, "output tokens per request")
_ARENA_MB = flags.DEFINE_float("arena_mb", 8.0, "KV arena (MiB)")
_PRESSURE_MB = flags.DEFINE_float("pressure_arena_mb", 0.4, "KV arena of the pressure workload (MiB)")
_TPB = flags.DEFINE_integer("tokens_per_block", 16, "tokens per KV block")
_REPS = flags.DEFINE_integer("reps", 2, "runs per mode (alternating off/on; medians)")
_SEED = flags.DEFINE_integer("seed", 0, "workload seed")
_OUT = flags.DEFINE_string("output_dir", "runs/prefix_cache", "where to write prefix_cache.json")


def build_engine(arena_mb: float):
    from fineserve_jax import Engine, ModelSpec
    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.scheduler.local import SchedulerConfig

    specs = [ModelSpec(e, *e.split(":", 1)) for e in _MODELS.value]
    return Engine(specs, arena_bytes=int(arena_mb * (1 << 20)), tokens_per_block=_TPB.value,
                  max_model_len=_PREFIX.value + _PROMPT.value + _OUTPUT.value + 16,
                  slab_target_bytes=1, buckets=Buckets(decode_sizes=(1, 4, 16, 32),
                                                       prefill_sizes=(32, 128, 512), prefill_seqs=8),
                  scheduler=SchedulerConfig(admission="fcfs", execution="round_robin", drop=False))


def workload(engine, shared_fraction: float, run: int):
    from fineserve_jax import Request, SamplingParams
    from fineserve_jax.workload import PrefixSharing, generate_workload

    names = list(engine.models)
    sharing = PrefixSharing(shared_fraction, _PREFIX.value) if shared_fraction > 0 else None
    wl = generate_workload({n: 1.0 for n in names}, num_requests=_NUM.value, seed=_SEED.value,
                           lengths=(_PROMPT.value, _OUTPUT.value), prefixes=sharing)
    base = (run + 1) * 10_000_000  # request ids stay unique across runs of one engine
    return [Request(w.model, w.prompt_tokens(engine.models[w.model].config.vocab_size),
                    SamplingParams(max_tokens=w.output_len, ignore_eos=True),
                    request_id=base + w.request_id) for w in wl]


def measure(engine, reqs, caching: bool) -> dict:
    engine.reconfigure(enable_prefix_caching=caching)
    alloc = engine.allocator
    reformat0, preempt0 = alloc.reformatted_slabs, engine.scheduler.num_preemptions
    t0 = time.perf_counter()
    outs = engine.run(reqs, realtime=False)
    wall = time.perf_counter() - t0
    ids = {r.request_id for r in reqs}
    recs = [r for r in engine.records() if r.request_id in ids]
    ttft = [r.ttft_s for r in recs if r.status == "finished"]
    out_tokens = sum(len(o.token_ids) for o in outs)
    stats = engine.scheduler.prefix_cache_stats() or {}
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    return {"caching": caching, "wall_s": wall, "output_tokens_per_s": out_tokens / wall,
            "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "finished": sum(o.status == "finished" for o in outs),
            "hit_rate": sum(o.num_cached_tokens for o in outs) / prompt if prompt else None,
            "evicted_blocks": stats.get("evicted_blocks", 0),
            "reformatted_slabs": alloc.reformatted_slabs - reformat0,
            "preemptions": engine.scheduler.num_preemptions - preempt0,
            "_tokens": [o.token_ids for o in outs]}


def compare(engine, shared_fraction: float, run0: int) -> dict:
    """Alternating off/on runs of the same requests; medians, ratios, equal outputs."""
    runs = {False: [], True: []}
    run = run0
    for _ in range(_REPS.value):
        for caching in (False, True):
            runs[caching].append(measure(engine, workload(engine, shared_fraction, run), caching))
            run += 1
    med = {c: {k: statistics.median(r[k] for r in rs) if isinstance(rs[0][k], (int, float)) else rs[0][k]
               for k in rs[0] if not k.startswith("_")} for c, rs in runs.items()}
    same = all(r["_tokens"] == runs[False][0]["_tokens"] for r in runs[True] + runs[False])
    off, on = med[False], med[True]
    return {"off": off, "on": on, "same_outputs": same,
            "ttft_p50_ratio_off_on": (off["ttft_p50_s"] / on["ttft_p50_s"]) if on["ttft_p50_s"] else None,
            "throughput_ratio_on_off": on["output_tokens_per_s"] / off["output_tokens_per_s"]}


def main(argv):
    del argv
    import jax

    t0 = time.perf_counter()
    engine = build_engine(_ARENA_MB.value)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s ({jax.default_backend()}, {engine.impl})")
    measure(engine, workload(engine, _FRACTION.value, 999), False)  # warm the host path
    result = {"config": {k: v.value for k, v in flags.FLAGS.__flags.items()
                         if k in {"models", "num_requests", "shared_fraction", "prefix_len", "prompt_len",
                                  "output_len", "arena_mb", "pressure_arena_mb", "tokens_per_block",
                                  "reps", "seed"}},
              "backend": jax.default_backend()}
    result["shared"] = compare(engine, _FRACTION.value, 0)
    result["unique"] = compare(engine, 0.0, 100)
    pressure = build_engine(_PRESSURE_MB.value)
    result["pressure"] = compare(pressure, _FRACTION.value, 200)

    s, u, p = result["shared"], result["unique"], result["pressure"]
    print(f"{'workload':<10} {'cache':<5} {'TTFT p50 ms':>12} {'out tok/s':>10} {'hit %':>6} "
          f"{'evicted':>8} {'reformatted slabs':>18} {'preempt':>8}")
    for name, r in (("shared", s), ("unique", u), ("pressure", p)):
        for key in ("off", "on"):
            m = r[key]
            print(f"{name:<10} {key:<5} {m['ttft_p50_s'] * 1e3:>12.1f} {m['output_tokens_per_s']:>10.1f} "
                  f"{100 * (m['hit_rate'] or 0):>6.1f} {m['evicted_blocks']:>8.0f} "
                  f"{m['reformatted_slabs']:>18.0f} {m['preemptions']:>8.0f}")
    print(f"shared prefixes: TTFT p50 {s['ttft_p50_ratio_off_on']:.2f}x lower, output tokens/s "
          f"{s['throughput_ratio_on_off']:.2f}x, same outputs: {s['same_outputs']}")
    print(f"no shared prefixes: output tokens/s on/off {u['throughput_ratio_on_off']:.3f} "
          f"(tax {100 * (1 - u['throughput_ratio_on_off']):+.1f}%), same outputs: {u['same_outputs']}")
    print(f"under pressure: slabs reformatted for another format off {p['off']['reformatted_slabs']:.0f}, "
          f"on {p['on']['reformatted_slabs']:.0f}; same outputs: {p['same_outputs']}")
    write_json(_OUT.value, "prefix_cache.json", result)


if __name__ == "__main__":
    app.run(main)

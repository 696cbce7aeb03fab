"""Measure real engine step times and write them in the FineServe profile CSV format, so the
cost model (`CostModel.from_csv`) and the simulator can use this machine's numbers.

    python -m experiments.profile --output=runs/profile/cpu-tiny.csv
    python -m experiments.profile --models=tiny-llama:org --batch_sizes=1,4 --input_lens=32

For every model, batch size B and prompt length L: B requests of L random tokens and
`--output_len` tokens each (ignore_eos) are queued at once on a warmed-up engine (all steps
compiled ahead of time), so the engine runs one prefill step of B x L tokens and then decode
steps of batch B. From the engine's request records (median over --reps runs):

    prefill_time  first token of the last request - arrival        (the prefill step)
    ttft          mean time to first token
    decode_time   last finish - last first token                   (output_len - 1 steps)
    tpot          decode_time / (output_len - 1)
    e2e           last finish - arrival
With --wakeup_idle_s > 0 it also measures, per model, how much longer a prefill takes when
it is the first step after that long an idle spell (CPU backends: the XLA thread pool and
caches go cold) and writes it to <output>.wakeup.json; `SimConfig.wakeup_s` charges it.
Columns: model, qformat, tp, mps_percentage, batch_size, input_len, output_len, seq_len,
prefill_time, decode_time, ttft, tpot, e2e (seconds), the same as the shared FineServe
profiles. Only (B, L) whose prefill fits one step (B <= the prefill bucket's sequences,
B x L <= the largest prefill bucket) are measured: the profile is of single steps. The
`model` column is the served name's config (e.g. tiny-llama), `qformat` the preset.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from typing import Dict, List, Sequence

import numpy as np
from absl import app, flags

from fineserve_jax.scheduler.cost import PROFILE_COLUMNS as COLUMNS

_MODELS = flags.DEFINE_list("models", ["tiny-llama:org", "tiny-mistral:fp8_kv8", "tiny-qwen2:qoq"],
                            "config:preset entries to profile")
_BATCH = flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8"], "batch sizes")
_INPUT = flags.DEFINE_list("input_lens", ["16", "32", "64"], "prompt lengths (tokens)")
_OUTPUT_LEN = flags.DEFINE_integer("output_len", 16, "output tokens per request")
_REPS = flags.DEFINE_integer("reps", 3, "repetitions per configuration (median)")
_ARENA_MB = flags.DEFINE_float("arena_mb", 8.0, "KV arena size (MiB)")
_MAXLEN = flags.DEFINE_integer("max_model_len", 256, "longest prompt + output")
_IMPL = flags.DEFINE_string("attention_impl", "auto", "reference | pallas_triton | auto")
_DTYPE = flags.DEFINE_string("dtype", "float32", "float32 | bfloat16")
_SEED = flags.DEFINE_integer("seed", 0, "prompt and weight seed")
_WAKEUP_IDLE = flags.DEFINE_float("wakeup_idle_s", 0.1, "also measure the extra cost of the first "
                                  "step after this long idle (0: skip)")
_OUT = flags.DEFINE_string("output", "runs/profile/cpu-tiny.csv", "CSV to write")


def parse_models(entries: Sequence[str]):
    """"config:preset" -> [(served name, config, preset)]; the served name is the entry."""
    out = []
    for e in entries:
        config, _, preset = e.partition(":")
        out.append((f"{config}:{preset or 'org'}", config, preset or "org"))
    return out


def measure(engine, name: str, batch: int, input_len: int, output_len: int, rng,
            next_id: List[int]) -> Dict[str, float]:
    """One run of `batch` identical-length requests queued at once; the profile row's times."""
    from fineserve_jax.core.request import Request
    from fineserve_jax.core.sampling_params import SamplingParams

    vocab = engine.models[name].config.vocab_size
    reqs = []
    for _ in range(batch):
        prompt = [1] + rng.integers(3, min(vocab, 259), size=input_len - 1).tolist()
        reqs.append(Request(model=name, prompt=prompt, request_id=next_id[0],
                            sampling=SamplingParams(max_tokens=output_len, ignore_eos=True)))
        next_id[0] += 1
    ids = {r.request_id for r in reqs}
    outs = engine.run(reqs, realtime=False)
    bad = [o for o in outs if o.status != "finished"]
    if bad:
        raise RuntimeError(f"profiling request failed: {bad[0].status} {bad[0].error or bad[0].finish_reason}")
    recs = [r for r in engine.records() if r.request_id in ids]
    t0 = min(r.arrival_s for r in recs)
    first = max(r.first_token_s for r in recs)
    end = max(r.finish_s for r in recs)
    decode = end - first
    return {"prefill_time": first - t0, "ttft": statistics.fmean(r.ttft_s for r in recs),
            "decode_time": decode, "tpot": decode / max(output_len - 1, 1), "e2e": end - t0}


def profile_engine(engine, models, batch_sizes: Sequence[int], input_lens: Sequence[int],
                   output_len: int, reps: int, seed: int = 0, log=print) -> List[Dict[str, object]]:
    """Profile rows (COLUMNS) for `models` [(served name, config, preset)] on a built engine."""
    rng = np.random.default_rng(seed)
    b = engine.buckets
    next_id = [10_000_000]
    rows = []
    for name, config, preset in models:
        measure(engine, name, 1, min(input_lens), output_len, rng, next_id)  # warm the host path
        for L in input_lens:
            for B in batch_sizes:
                if B > b.prefill_seqs or B * L > b.max_prefill or L + output_len > engine.max_len[name]:
                    log(f"  skip {name} B={B} L={L}: prefill would not be one step")
                    continue
                runs = [measure(engine, name, B, L, output_len, rng, next_id) for _ in range(reps)]
                row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rows.append({"model": config, "qformat": preset, "tp": 1, "mps_percentage": 100,
                             "batch_size": B, "input_len": L, "output_len": output_len,
                             "seq_len": L + output_len, **row})
                log(f"  {name} B={B:>2} L={L:>3}: prefill {row['prefill_time'] * 1e3:7.2f} ms, "
                    f"tpot {row['tpot'] * 1e3:6.2f} ms")
    return rows


def measure_wakeup(engine, models, input_len: int, output_len: int, reps: int, idle_s: float,
                   seed: int = 0) -> Dict[str, float]:
    """Per model: median prefill time of one request after `idle_s` of idling minus the same
    back to back (a CPU's thread pool and caches go cold when the engine sleeps)."""
    rng = np.random.default_rng(seed + 7)
    next_id = [20_000_000]
    out = {}
    for name, _, _ in models:
        warm, cold = [], []
        for _ in range(reps):
            warm.append(measure(engine, name, 1, input_len, output_len, rng, next_id)["prefill_time"])
            time.sleep(idle_s)
            cold.append(measure(engine, name, 1, input_len, output_len, rng, next_id)["prefill_time"])
        out[name] = max(statistics.median(cold) - statistics.median(warm), 0.0)
    return out


def wakeup_path(csv_path: str) -> str:
    """The side file of a profile CSV holding the wake-up penalties (JSON)."""
    return os.path.splitext(csv_path)[0] + ".wakeup.json"


def write_csv(rows, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in COLUMNS})


def build_engine(models, arena_mb: float, max_model_len: int, impl: str, dtype: str, seed: int,
                 scheduler=None, tokens_per_block: int = 16):
    """An engine serving `models` [(served name, config, preset)]; FCFS without dropping by
    default (profiling wants every request to run, batched as queued)."""
    from fineserve_jax.engine.device_engine import Engine, ModelSpec
    from fineserve_jax.scheduler.local import SchedulerConfig

    scheduler = scheduler or SchedulerConfig(admission="fcfs", execution="fcfs", drop=False)
    return Engine([ModelSpec(n, c, p) for n, c, p in models], arena_bytes=int(arena_mb * (1 << 20)),
                  max_model_len=max_model_len, attention_impl=impl, dtype=dtype, seed=seed,
                  scheduler=scheduler, tokens_per_block=tokens_per_block)


def main(argv):
    del argv
    import jax

    models = parse_models(_MODELS.value)
    t0 = time.perf_counter()
    engine = build_engine(models, _ARENA_MB.value, _MAXLEN.value, _IMPL.value, _DTYPE.value, _SEED.value)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s on {jax.default_backend()} "
          f"({engine.impl} attention, {engine.warmup_compiles} compiles)")
    rows = profile_engine(engine, models, [int(x) for x in _BATCH.value], [int(x) for x in _INPUT.value],
                          _OUTPUT_LEN.value, _REPS.value, _SEED.value)
    write_csv(rows, _OUT.value)
    if _WAKEUP_IDLE.value > 0:
        wake = measure_wakeup(engine, models, min(int(x) for x in _INPUT.value), _OUTPUT_LEN.value,
                              max(_REPS.value, 5), _WAKEUP_IDLE.value, _SEED.value)
        with open(wakeup_path(_OUT.value), "w") as f:
            json.dump({"idle_s": _WAKEUP_IDLE.value, "wakeup_s": wake}, f, indent=2)
        print("first step after idle: " + ", ".join(f"{n} +{v * 1e3:.2f} ms" for n, v in wake.items()))
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.1f} s; steady-state compiles "
          f"{engine.steady_state_compiles}; wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

"""Host cost of the KV slab allocator per engine iteration.

Simulates `--num_seqs` running sequences in decode (default 256): every iteration each
sequence generates one token and, at a block boundary (every `tokens_per_block` tokens),
allocates one block; a finished sequence frees all its blocks and is replaced by a new one,
which allocates its prompt's blocks. Sequences use three real KV formats (Llama-3.1-8B bf16
and fp8 KV, Qwen2.5-32B int4 KV). Only the allocator calls are timed.

    python -m experiments.allocator_bench [--output_dir=runs/allocator_bench]

Prints a table and writes `allocator_bench.json` (config, command, machine, figures).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import numpy as np
from absl import app, flags

from fineserve_jax.formats import KVFormat
from fineserve_jax.kvslab import SlabAllocator, choose_slab_bytes, num_slabs_for_arena
from models.presets import get_model_config

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_seqs", 256, "Sequences running at all times.")
flags.DEFINE_integer("iterations", 6000, "Engine iterations to time (after warm-up).")
flags.DEFINE_integer("warmup", 1000, "Iterations run before timing (ramp-up, first formats).")
flags.DEFINE_integer("tokens_per_block", 16, "Tokens per KV block.")
flags.DEFINE_float("prompt_mean", 161.0, "Mean prompt length (lognormal).")
flags.DEFINE_float("output_mean", 338.0, "Mean output length (lognormal).")
flags.DEFINE_integer("max_tokens", 4096, "Cap on prompt + output tokens of one sequence.")
flags.DEFINE_integer("seed", 0, "RNG seed.")
flags.DEFINE_string("output_dir", "runs/allocator_bench", "Where to write the JSON.")

# (model preset, KV dtype) of the mixed workload; shared with experiments.fragmentation.
FORMATS = (("llama-3.1-8b", "bf16"), ("llama-3.1-8b", "fp8"), ("qwen2.5-32b", "int4"))


def kv_format(model: str, kv_dtype: str, tokens_per_block: int) -> KVFormat:
    cfg = get_model_config(model)
    return KVFormat(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype,
                    tokens_per_block=tokens_per_block)


def lognormal_lengths(rng, mean: float, sigma: float, size, lo: int, hi: int) -> np.ndarray:
    """Integer lengths, lognormal with the given mean (before clipping to [lo, hi])."""
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, size)), lo, hi).astype(np.int64)


def run_bench(num_seqs: int, iterations: int, warmup: int, tokens_per_block: int,
              prompt_mean: float, output_mean: float, max_tokens: int, seed: int) -> dict:
    """Returns per-iteration allocator times (us) and op counts of the timed iterations."""
    rng = np.random.default_rng(seed)
    blocks = [kv_format(m, d, tokens_per_block).block_bytes for m, d in FORMATS]
    choice = choose_slab_bytes(blocks)
    # Big enough that the bench never runs out: every sequence at its longest, largest block.
    worst = num_seqs * (-(-max_tokens // tokens_per_block) + 1) * max(blocks)
    alloc = SlabAllocator(num_slabs_for_arena(worst * 2, choice.slab_bytes), choice.slab_bytes)

    def new_seq():
        p = int(lognormal_lengths(rng, prompt_mean, 1.0, None, 1, max_tokens // 2))
        o = int(lognormal_lengths(rng, output_mean, 0.8, None, 1, max_tokens - p))
        return blocks[rng.integers(len(blocks))], p, p + o

    # Per sequence: block bytes, block table, current length, final length.
    seq_b, tables, length, final = [], [], [], []
    starting = set(range(num_seqs))  # slots whose new sequence allocates its prompt
    for _ in range(num_seqs):
        b, p, f = new_seq()
        seq_b.append(b), tables.append(None), length.append(p), final.append(f)
    times, n_alloc, n_free = [], [], []
    tpb = tokens_per_block
    perf = time.perf_counter_ns
    for it in range(warmup + iterations):
        # Host bookkeeping outside the timed region: who grows, who finishes.
        growing, finishing = [], []
        for s in range(num_seqs):
            if s in starting:
                continue
            length[s] += 1
            if length[s] >= final[s]:
                finishing.append(s)
            elif length[s] % tpb == 1:
                growing.append(s)
        start_list = sorted(starting)
        t0 = perf()
        for s in finishing:
            alloc.free(seq_b[s], tables[s])
        for s in start_list:
            tables[s] = alloc.allocate(seq_b[s], -(-length[s] // tpb))
        for s in growing:
            tables[s] += alloc.allocate(seq_b[s], 1)
        t1 = perf()
        if it >= warmup:
            times.append((t1 - t0) / 1e3)
            n_alloc.append(len(start_list) + len(growing))
            n_free.append(len(finishing))
        starting = set()
        for s in finishing:
            b, p, f = new_seq()
            seq_b[s], length[s], final[s] = b, p, f
            starting.add(s)
    t = np.asarray(times)
    return {
        "slab": {"slab_bytes": choice.slab_bytes, "mode": choice.mode,
                 "num_slabs": alloc.num_slabs, "block_bytes": blocks},
        "us_per_iteration": {
            "mean": float(t.mean()), "p50": float(np.percentile(t, 50)),
            "p99": float(np.percentile(t, 99)), "max": float(t.max()),
        },
        "allocate_calls_per_iteration": float(np.mean(n_alloc)),
        "free_calls_per_iteration": float(np.mean(n_free)),
        "us_per_call": float(t.sum() / max(1, sum(n_alloc) + sum(n_free))),
        "final_stats": {"used_bytes": alloc.used_bytes, "free_slabs": alloc.free_slabs},
    }


def main(argv):
    del argv
    cfg = dict(num_seqs=FLAGS.num_seqs, iterations=FLAGS.iterations, warmup=FLAGS.warmup,
               tokens_per_block=FLAGS.tokens_per_block, prompt_mean=FLAGS.prompt_mean,
               output_mean=FLAGS.output_mean, max_tokens=FLAGS.max_tokens, seed=FLAGS.seed)
    res = run_bench(**cfg)
    us = res["us_per_iteration"]
    print(f"KV slab allocator, {cfg['num_seqs']} sequences, {cfg['iterations']} iterations "
          f"(slab {res['slab']['slab_bytes']} B, {res['slab']['mode']})")
    print(f"{'metric':34s} {'value':>10s}")
    for k in ("mean", "p50", "p99", "max"):
        print(f"{'us per iteration, ' + k:34s} {us[k]:10.2f}")
    print(f"{'allocate calls per iteration':34s} {res['allocate_calls_per_iteration']:10.2f}")
    print(f"{'free calls per iteration':34s} {res['free_calls_per_iteration']:10.2f}")
    print(f"{'us per call':34s} {res['us_per_call']:10.2f}")
    out = {
        "config": cfg,
        "results": res,
        "command": " ".join(["python -m experiments.allocator_bench"] + sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
    }
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    path = os.path.join(FLAGS.output_dir, "allocator_bench.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)

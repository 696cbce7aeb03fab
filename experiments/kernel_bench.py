"""Decode-attention kernel benchmark: Pallas Triton kernel vs the XLA paths.

    PYTHONPATH=. python -m experiments.kernel_bench --output_dir=runs/kernel_bench   # GPU grid
    python -m experiments.kernel_bench --quick --output_dir=/tmp/kb                  # CPU smoke

For each model geometry (Llama-3.1-8B heads: 32 q / 8 kv / dim 128; a 70B-like one: 64 / 8 /
128), KV dtype, batch and context, one layer's decode attention over a paged arena (random
block permutation, every sequence at the full context) is timed for each impl: warm-up
calls, then the median of `--reps` calls, each ended by `block_until_ready`. Impls: the
Pallas kernel, "xla" (the XLA path that reads only the live blocks) and "reference" (the
oracle that gathers whole block-table rows). Reported per call: time, bytes moved (the K/V
words of the context incl. scales, plus q, output and block tables: what an ideal kernel
must move), achieved bandwidth and its fraction of a device-to-device copy measured in the
same run, query tokens/s (batch / time) and the xla/kernel and reference/kernel time ratios. Results go to OUTPUT_DIR/kernel_bench.json (rewritten after
every measurement, so a run cut short keeps what it measured) and a table is printed.

On a CPU the kernel runs in Pallas interpret mode: the numbers only prove the script works.
The full GPU grid takes longer than one 10-minute device call; split it with --models /
--kv_dtypes (see WORKSPACE_NOTES.md "Kernel benchmark").
"""

from __future__ import annotations

import datetime
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fineserve_jax.formats import KV_DTYPES, KVFormat
from experiments.kv_data import random_view
from experiments.timing import copy_bandwidth, time_call
from pallas_kernels import decode_attention, resolve_impl

GEOMETRIES = {  # name: (q heads, kv heads, head dim)
    "llama8b": (32, 8, 128),
    "llama70b": (64, 8, 128),
    "tiny": (4, 2, 32),
}

_OUT = flags.DEFINE_string("output_dir", "runs/kernel_bench", "where to write kernel_bench.json")
_QUICK = flags.DEFINE_boolean("quick", False, "small CPU-sized grid (smoke test)")
_MODELS = flags.DEFINE_list("models", None, f"geometries, of {sorted(GEOMETRIES)}")
_BATCHES = flags.DEFINE_list("batches", None, "batch sizes")
_CONTEXTS = flags.DEFINE_list("contexts", None, "context lengths (tokens)")
_DTYPES = flags.DEFINE_list("kv_dtypes", None, f"KV dtypes, of {list(KV_DTYPES)}")
_IMPLS = flags.DEFINE_list("impls", ["pallas_triton", "xla", "reference"],
                           "implementations to time")
_TPB = flags.DEFINE_integer("tokens_per_block", None, "tokens per KV block (16; quick: 8)")
_LAYERS = flags.DEFINE_integer("num_layers", 1, "layers in the block format (the kernel reads "
                               "one; more layers only spread a block's rows apart)")
_SPLITS = flags.DEFINE_integer("num_splits", None, "split-K factor (default: heuristic)")
_REPS = flags.DEFINE_integer("reps", None, "timed calls per measurement (median; 20, quick 2)")
_WARMUP = flags.DEFINE_integer("warmup", None, "untimed calls after compiling (3, quick 1)")
_MEM_FRACTION = flags.DEFINE_float("mem_fraction", 0.7, "skip a measurement whose estimated "
                                   "footprint exceeds this fraction of device memory")
_SEED = flags.DEFINE_integer("seed", 0, "random data seed")


def _defaults():
    quick = _QUICK.value
    pick = lambda flag, full, small: flag.value if flag.value is not None else (
        small if quick else full)
    return dict(
        models=pick(_MODELS, ["llama8b", "llama70b"], ["tiny"]),
        batches=[int(x) for x in pick(_BATCHES, [1, 8, 32, 64, 128], [1, 2])],
        contexts=[int(x) for x in pick(_CONTEXTS, [512, 4096, 32768], [16, 40])],
        kv_dtypes=pick(_DTYPES, list(KV_DTYPES), ["bf16", "int4"]),
        tokens_per_block=pick(_TPB, 16, 8),
        reps=pick(_REPS, 20, 2),
        warmup=pick(_WARMUP, 3, 1),
        impls=list(_IMPLS.value),
    )


def bytes_moved(fmt: KVFormat, batch: int, context: int, hq: int, q_itemsize: int) -> int:
    """What an ideal decode kernel reads and writes for one layer."""
    kv_row_bytes = (fmt.data_words + fmt.scale_words) * 4
    kv = batch * context * 2 * fmt.num_kv_heads * kv_row_bytes
    width = fmt.blocks_for_tokens(context)
    return kv + 2 * batch * hq * fmt.head_dim * q_itemsize + batch * (width + 1) * 4


def _device_memory() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU backends may not implement it
        return None
    return stats.get("bytes_limit")


def _footprint(fmt: KVFormat, impl: str, batch: int, context: int) -> int:
    """Rough peak bytes: arena (+ its construction copy), plus for the XLA paths their
    gathered words and float32 K/V (reference: the whole context at once; xla: one step)."""
    arena = (batch * fmt.blocks_for_tokens(context) + 1) * fmt.block_bytes
    extra = 0
    if impl == "xla":
        context = min(context, 64)
    if impl in ("reference", "xla"):
        extra = batch * context * fmt.num_kv_heads * (
            2 * (fmt.data_words + fmt.scale_words) * 4 + 2 * 2 * fmt.head_dim * 4)
    return 2 * arena + extra


def run_grid(cfg: dict, output_dir: str) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "kernel_bench.json")
    backend = jax.default_backend()
    device = jax.devices()[0]
    mem_limit = _device_memory()
    copy_bytes = (1 << 30) if backend == "gpu" else (32 << 20)
    copy_bw = copy_bandwidth(copy_bytes, cfg["reps"], cfg["warmup"])
    report = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "jax": jax.__version__, "backend": backend,
            "device": getattr(device, "device_kind", str(device)),
            "copy_bandwidth_GBps": copy_bw / 1e9, "copy_bytes": copy_bytes,
            "interpret": backend != "gpu", "config": cfg,
        },
        "results": [],
    }
    key = jax.random.PRNGKey(_SEED.value)
    rng = np.random.default_rng(_SEED.value)
    for model in cfg["models"]:
        hq, hkv, d = GEOMETRIES[model]
        for kv_dtype in cfg["kv_dtypes"]:
            fmt = KVFormat(_LAYERS.value, hkv, d, kv_dtype, cfg["tokens_per_block"])
            for batch in cfg["batches"]:
                for context in cfg["contexts"]:
                    width = fmt.blocks_for_tokens(context)
                    num_blocks = batch * width + 1  # + the null block 0
                    row = dict(model=model, kv_dtype=kv_dtype, batch=batch, context=context,
                               bytes=bytes_moved(fmt, batch, context, hq, 2))
                    if mem_limit and _footprint(fmt, "pallas_triton", batch, context) > \
                            _MEM_FRACTION.value * mem_limit:
                        row["skipped"] = "arena does not fit"
                        report["results"].append(row)
                        continue
                    key, k1, k2 = jax.random.split(key, 3)
                    view = random_view(fmt, num_blocks, k1)
                    tables = jnp.asarray(1 + rng.permutation(num_blocks - 1)
                                         .reshape(batch, width).astype(np.int32))
                    lengths = jnp.full((batch,), context, jnp.int32)
                    q = jax.random.normal(k2, (batch, hq, d), jnp.bfloat16)
                    for impl in cfg["impls"]:
                        if mem_limit and _footprint(fmt, impl, batch, context) > \
                                _MEM_FRACTION.value * mem_limit:
                            row[impl] = {"skipped": "does not fit"}
                            continue
                        fn = jax.jit(functools.partial(
                            decode_attention, fmt=fmt, layer=0, impl=impl,
                            num_splits=_SPLITS.value if impl == "pallas_triton" else None,
                            interpret=None))
                        try:
                            t = time_call(fn, (q, view, tables, lengths), cfg["reps"],
                                           cfg["warmup"])
                        except Exception as exc:  # OOM or a compile error: record, go on
                            row[impl] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                            continue
                        bw = row["bytes"] / t
                        row[impl] = {"time_us": t * 1e6, "GBps": bw / 1e9,
                                     "frac_copy_bw": bw / copy_bw, "tokens_per_s": batch / t,
                                     "resolved_impl": resolve_impl(impl, fmt)}
                    ker = row.get("pallas_triton", {})
                    for impl, key in (("reference", "ref_over_kernel"), ("xla", "xla_over_kernel")):
                        other = row.get(impl, {})
                        if "time_us" in other and "time_us" in ker:
                            row[key] = other["time_us"] / ker["time_us"]
                    del view, tables
                    report["results"].append(row)
                    print(_format_row(row), flush=True)
                    with open(path, "w") as f:
                        json.dump(report, f, indent=1)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return report


def _cell(r: dict) -> str:
    if not r:
        return "-"
    if "time_us" not in r:
        return (r.get("skipped") or r.get("error", "?"))[:28]
    return f"{r['time_us']:10.1f}us {r['GBps']:7.1f}GB/s {100 * r['frac_copy_bw']:5.1f}%"


def _format_row(row: dict) -> str:
    head = f"{row['model']:9s} {row['kv_dtype']:5s} B={row['batch']:<4d} ctx={row['context']:<6d}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    ratio = lambda k: f"{row[k]:6.2f}x" if row.get(k) else "     -"  # noqa: E731
    return (f"{head} kernel {_cell(row.get('pallas_triton', {}))} | "
            f"xla {_cell(row.get('xla', {}))} | ref {_cell(row.get('reference', {}))} | "
            f"xla/kernel {ratio('xla_over_kernel')} ref/kernel {ratio('ref_over_kernel')}")


def main(argv):
    del argv
    cfg = _defaults()
    unknown = set(cfg["models"]) - set(GEOMETRIES)
    if unknown:
        raise app.UsageError(f"unknown --models {sorted(unknown)}; valid: {sorted(GEOMETRIES)}")
    print(f"backend {jax.default_backend()} ({jax.devices()[0]}), JAX {jax.__version__}")
    report = run_grid(cfg, _OUT.value)
    print(f"copy bandwidth {report['meta']['copy_bandwidth_GBps']:.1f} GB/s; wrote "
          f"{os.path.join(_OUT.value, 'kernel_bench.json')} ({len(report['results'])} rows)")


if __name__ == "__main__":
    app.run(main)

"""Tensor-parallel layouts and their cost, from the code's own accounting.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m experiments.tp_report --output_dir=runs/tp_report

Prints and writes (report.json):
  1. every parameter's layout for each precision preset (path, global and per-device shape,
     dtype, rule) of `--config` at `--tp` (abstract models: no memory, no weights), with the
     bytes one device holds (weights and KV per token), e.g. a 70B model on 8 GPUs;
  2. the collectives of one decoder layer, counted in the partitioned, compiled decode step of
     a tiny model of each preset at `--collectives_tp` (needs that many devices);
  3. the embedding/LM head choice: per-device bytes and measured step time, vocabulary-parallel
     vs replicated, for `--measure_config` at `--measure_tp` (CPU devices share the host's cores,
     so times show overheads, not GPU speed).
"""

from __future__ import annotations

import time

from absl import app, flags

from experiments.output import write_json

_CONFIG = flags.DEFINE_string("config", "llama-3.1-70b", "model shape for the layout tables")
_TP = flags.DEFINE_integer("tp", 8, "tensor-parallel size for the layout tables")
_PRESETS = flags.DEFINE_list("presets", ["org", "fp8", "int8", "awq", "qoq"], "precision presets")
_COLL_TP = flags.DEFINE_integer("collectives_tp", 2, "tp of the compiled tiny steps (0: skip)")
_MEASURE = flags.DEFINE_string("measure_config", "smollm2-135m",
                               "shape for the vocab-parallel timing ('' to skip)")
_MEASURE_LAYERS = flags.DEFINE_integer("measure_layers", 4, "layers of that shape (cheaper)")
_MEASURE_TP = flags.DEFINE_integer("measure_tp", 3,
                                   "tp of the timing (SmolLM2: 9 query, 3 KV heads)")
_REPS = flags.DEFINE_integer("reps", 10, "timed calls (minimum reported)")
_TABLES = flags.DEFINE_boolean("print_tables", True, "print every parameter's layout")
_OUT = flags.DEFINE_string("output_dir", "runs/tp_report", "where report.json goes")

GiB = float(1 << 30)


def layouts_of(config: str, preset: str, tp: int):
    from flax import nnx

    from fineserve_jax.engine import sharding as S
    from fineserve_jax.quant.ptq import quantized_structure
    from models.presets import ALL

    cfg = ALL[config]
    module = quantized_structure(cfg, preset, "bfloat16")
    return cfg, S.param_layouts(nnx.state(module), cfg, tp)


def layout_report(config: str, preset: str, tp: int) -> dict:
    from fineserve_jax.engine import sharding as S
    from fineserve_jax.formats import KVFormat, get_preset

    cfg, lays = layouts_of(config, preset, tp)
    b = S.device_bytes(lays, tp)
    split = S.kv_split(cfg.num_heads, cfg.num_kv_heads, tp)
    full = KVFormat(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, get_preset(preset).kv, 16)
    local = S.local_kv_format(full, split)
    return {
        "config": config, "preset": preset, "tp": tp,
        "param_bytes": b.param_bytes_total, "param_bytes_per_gpu": b.param_bytes_per_device,
        "replicated_bytes_per_gpu": b.replicated_bytes,
        "kv_heads_per_gpu": split.local_heads, "kv_replication": split.replication,
        "kv_bytes_per_token": full.bytes_per_token,
        "kv_bytes_per_token_per_gpu": local.bytes_per_token,
        "layouts": [{"path": lay.path, "shape": list(lay.shape),
                     "per_gpu": list(lay.local_shape(tp)), "dtype": lay.dtype, "rule": lay.rule}
                    for lay in lays],
        "table": S.layout_table(lays, tp),
    }


def collectives_report(tp: int) -> dict:
    import jax

    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.engine import sharding as S
    from fineserve_jax.engine.model_runner import ModelRunner
    from fineserve_jax.kvslab import arena as A
    from fineserve_jax.loader import load_model

    if len(jax.devices()) < tp:
        return {"skipped": f"needs {tp} devices, have {len(jax.devices())}"}
    out = {}
    group = S.device_group(list(range(tp)))
    for preset in _PRESETS.value:
        model = load_model("tiny-llama", quant=preset, dtype="float32")
        split = S.kv_split(model.config.num_heads, model.config.num_kv_heads, tp)
        fmt = S.local_kv_format(model.kv_format(4), split)
        r = ModelRunner("m", model, fmt, Buckets(decode_sizes=(4,), prefill_sizes=(16,),
                                                 prefill_seqs=2, table_width=4), "auto",
                        group=group)
        arena = A.make_arena(2, fmt.block_bytes * 4, device=group.arena_sharding, parts=tp)
        text = r.compile_logits("decode", 4, arena).as_text()
        out[preset] = S.collectives(text)
    return out


def vocab_report(config: str, layers: int, tp: int, reps: int) -> dict:
    import jax
    import numpy as np

    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.engine import sharding as S
    from fineserve_jax.engine.model_runner import ModelRunner
    from fineserve_jax.kvslab import arena as A
    from fineserve_jax.loader import load_model

    if len(jax.devices()) < tp:
        return {"skipped": f"needs {tp} devices, have {len(jax.devices())}"}
    group = S.device_group(list(range(tp)))
    out = {}
    for vp in (True, False):
        model = load_model(config, quant="org", dtype="float32", random_weights=True,
                           num_layers=layers)
        split = S.kv_split(model.config.num_heads, model.config.num_kv_heads, tp)
        fmt = S.local_kv_format(model.kv_format(16), split)
        r = ModelRunner("m", model, fmt, Buckets(decode_sizes=(8,), prefill_sizes=(16,),
                                                 prefill_seqs=1, table_width=8), "auto",
                        group=group, vocab_parallel=vp)
        arena = A.make_arena(4, fmt.block_bytes * 8, device=group.arena_sharding, parts=tp)
        r.compile_all(arena)
        x = r.inputs_for("decode", 8)
        x.lengths[:], x.block_tables[:, 0] = 1, 8  # every row: one token in block 8
        x.slot_block[:] = 8
        best = float("inf")
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            arena, tok = r.run("decode", 8, arena, x)
            np.asarray(tok)
            best = min(best, time.perf_counter() - t0)
        b = S.device_bytes(r.layouts, tp)
        text = r.compile_logits("decode", 8, arena).as_text()
        out["vocab_parallel" if vp else "replicated"] = {
            "decode_step_ms": best * 1e3, "param_bytes_per_gpu": b.param_bytes_per_device,
            "collectives": S.collectives(text)}
        del r, model
    return {"config": config, "layers": layers, "tp": tp, **out}


def main(argv):
    del argv
    report = {"layouts": {}, "collectives": None, "vocab": None}
    print(f"{_CONFIG.value} at tp {_TP.value}: what one GPU holds")
    print(f"{'preset':<8} {'weights GiB':>12} {'per GPU GiB':>12} {'replicated':>11} "
          f"{'KV B/token':>11} {'per GPU':>8} {'KV heads/GPU':>13}")
    for p in _PRESETS.value:
        r = layout_report(_CONFIG.value, p, _TP.value)
        report["layouts"][p] = {k: v for k, v in r.items() if k != "table"}
        print(f"{p:<8} {r['param_bytes'] / GiB:>12.2f} {r['param_bytes_per_gpu'] / GiB:>12.2f} "
              f"{r['replicated_bytes_per_gpu'] / GiB:>11.3f} {r['kv_bytes_per_token']:>11} "
              f"{r['kv_bytes_per_token_per_gpu']:>8} {r['kv_heads_per_gpu']:>13}")
        if _TABLES.value:
            print(r["table"])
    if _COLL_TP.value:
        report["collectives"] = collectives_report(_COLL_TP.value)
        print(f"collectives of the compiled decode step, tiny-llama, tp {_COLL_TP.value}:")
        for p, c in report["collectives"].items():
            print(f"  {p:<8} per layer {c['per_layer'] if isinstance(c, dict) else c}  "
                  f"other {c.get('other') if isinstance(c, dict) else ''}")
    if _MEASURE.value:
        report["vocab"] = v = vocab_report(_MEASURE.value, _MEASURE_LAYERS.value,
                                           _MEASURE_TP.value, _REPS.value)
        print(f"embedding / LM head ({_MEASURE.value}, {_MEASURE_LAYERS.value} layers, tp "
              f"{_MEASURE_TP.value}, decode batch 8, best of {_REPS.value}):")
        for k in ("vocab_parallel", "replicated"):
            if k in v:
                print(f"  {k:<15} {v[k]['decode_step_ms']:8.2f} ms  per GPU "
                      f"{v[k]['param_bytes_per_gpu'] / 2**20:8.1f} MiB  other collectives "
                      f"{v[k]['collectives']['other']}")
    write_json(_OUT.value, "report.json", report)


if __name__ == "__main__":
    app.run(main)

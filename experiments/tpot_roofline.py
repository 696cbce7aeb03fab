"""Decode step time (TPOT) of the engine's compiled step against its memory roofline.

    PYTHONPATH=. python -m experiments.tpot_roofline --output_dir=runs/tpot     # GPU: 8B shape
    python -m experiments.tpot_roofline --quick --output_dir=runs/tpot          # CPU smoke

A random-weight model of a real-size shape (default Llama-3.1-8B, `org`) runs the engine's
AOT-compiled decode step at a fixed batch and context. Roofline = (weight bytes read per
step + KV bytes read per step) / the device copy bandwidth measured in the same run (bytes
read + written per second of an elementwise pass). Target (issue 6): measured <= 1.25 x
roofline at batch 32 on an H200.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import app, flags

from experiments.timing import copy_bandwidth, time_call

_MODEL = flags.DEFINE_string("model", "llama-3.1-8b", "model preset (real-size shape or tiny)")
_QUANT = flags.DEFINE_string("quant", "org", "precision preset")
_BATCH = flags.DEFINE_integer("batch", 32, "decode batch")
_CONTEXT = flags.DEFINE_integer("context", 1024, "context tokens per sequence")
_LAYERS = flags.DEFINE_integer("num_layers", 0, "override the layer count (0: the model's)")
_IMPL = flags.DEFINE_string("attention_impl", "auto", "reference | pallas_triton | auto")
_REPS = flags.DEFINE_integer("reps", 20, "timed steps")
_COPY_MB = flags.DEFINE_integer("copy_mb", 2048, "buffer for the copy-bandwidth measurement")
_QUICK = flags.DEFINE_boolean("quick", False, "CPU smoke: tiny-llama, batch 4, context 64")
_OUT = flags.DEFINE_string("output_dir", "runs/tpot_roofline", "where to write tpot_roofline.json")


def measure(model, batch: int, context: int, impl: str, reps: int, copy_bytes: int) -> dict:
    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.engine.device_engine import Engine, ModelSpec

    fmt = model.kv_format(16)
    blocks = fmt.blocks_for_tokens(context)
    slab = blocks * fmt.block_bytes  # one sequence per slab; + the null slab and a spare
    engine = Engine([ModelSpec("m", model)], arena_bytes=slab * (batch + 2),
                    max_model_len=context + 16, attention_impl=impl, compaction_interval=0,
                    slab_target_bytes=slab, profile_reps=0,
                    buckets=Buckets(decode_sizes=(batch,), prefill_sizes=(16,), prefill_seqs=1))
    runner = engine.runners["m"]
    x = runner.inputs_for("decode", batch)
    rng = np.random.default_rng(0)
    for row in range(batch):
        ids = engine.allocator.allocate(block_bytes=fmt.block_bytes, num_blocks=blocks)
        pos = context - 1
        x.tokens[row] = rng.integers(3, 250)
        x.positions[row] = x.q_pos[row] = pos
        x.slot_block[row] = ids[pos // 16]
        x.slot_offset[row] = pos % 16
        x.q_seq[row] = x.logits_idx[row] = row
        x.lengths[row] = context
        x.block_tables[row, :blocks] = ids
    state = {"arena": engine.arena}

    def step():
        state["arena"], tokens = runner.run("decode", batch, state["arena"], x)
        return tokens

    step_s = time_call(step, (), reps, warmup=3)
    bw = copy_bandwidth(copy_bytes, reps=10, warmup=2)
    # The embedding table is only gathered (one row per token) unless it is also the LM head.
    embed = 0 if model.config.tie_word_embeddings else model.config.vocab_size * model.config.hidden_size * 2
    weight_bytes = model.param_bytes - embed
    kv_read = batch * context * fmt.bytes_per_token
    roofline_s = (weight_bytes + kv_read) / bw
    return {"model": model.name, "preset": model.preset.name, "layers": model.config.num_layers,
            "batch": batch, "context": context, "attention_impl": engine.impl,
            "backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "jax": jax.__version__, "step_s": step_s, "weight_bytes": weight_bytes,
            "kv_bytes_read": kv_read, "copy_bandwidth_GBps": bw / 1e9,
            "roofline_s": roofline_s, "ratio_to_roofline": step_s / roofline_s,
            "tokens_per_s": batch / step_s}


def main(argv):
    del argv
    quick = _QUICK.value
    name = "tiny-llama" if quick else _MODEL.value
    batch, context = (4, 64) if quick else (_BATCH.value, _CONTEXT.value)
    copy_bytes = (64 << 20) if quick else (_COPY_MB.value << 20)
    from fineserve_jax.loader import load_model

    model = load_model(name, quant=_QUANT.value, dtype="bfloat16", random_weights=True,
                       num_layers=_LAYERS.value or None)
    r = measure(model, batch, context, _IMPL.value, 3 if quick else _REPS.value, copy_bytes)
    print(f"{r['model']} ({r['preset']}, {r['layers']} layers) decode batch {batch}, context "
          f"{context}, attention {r['attention_impl']} on {r['device']} (JAX {r['jax']}):")
    print(f"  step {r['step_s'] * 1e3:.3f} ms   roofline {r['roofline_s'] * 1e3:.3f} ms "
          f"(weights {r['weight_bytes'] / 1e9:.2f} GB + KV {r['kv_bytes_read'] / 1e9:.3f} GB "
          f"at {r['copy_bandwidth_GBps']:.0f} GB/s)   ratio {r['ratio_to_roofline']:.2f}x   "
          f"{r['tokens_per_s']:.0f} tok/s")
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "tpot_roofline.json"), "w") as f:
        json.dump(r, f, indent=2)


if __name__ == "__main__":
    app.run(main)

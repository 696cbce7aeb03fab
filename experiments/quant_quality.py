"""Quality and size of every precision preset against `org` on the same weights.

    python -m experiments.quant_quality --output_dir=runs/quant_quality

For each model and preset: parameter bytes (whole model and projections only, as stored in
bf16 deployment, ratio vs org), KV bytes per token (`KVFormat` with the preset's KV dtype),
and the error of the logits against the float `org` model over fixed token sequences
(`fineserve_jax.quant.quality.logit_metrics`):

  rel_err  = ||l - l_org||_F / ||l_org||_F over all [seqs, positions, vocab] logits
  max_rel  = max |l - l_org| / max |l_org|
  kl       = mean over positions of KL(softmax(l_org) || softmax(l)) in nats
  top1     = fraction of positions whose argmax agrees with org

Models (random weights; no checkpoint is downloaded):
  tiny-llama                the embedded 2-layer, 64-wide test model
  llama-3.1-8b-widths       Llama-3.1-8B shapes (hidden 4096, MLP 14336, 32/8 heads of 128)
                            with --big_layers layers (default 1) and a --big_vocab vocab
                            (default 8192) so a forward fits a 2-core CPU; byte ratios are
                            also reported for the full-depth, full-vocab config (abstract).
Quantized models compute with --dtype activations (default float32, so the errors are
quantization errors only); the `org-bf16` row is the same weights and activations in bf16,
for scale. The AWQ vs plain round-to-nearest (RTN) comparison uses the same model with a
few residual channels amplified by --outlier_gain in every RMSNorm weight: the persistent
large-magnitude activation channels real LLMs have and random-weight models lack.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from fineserve_jax.formats import KVFormat, get_preset
from fineserve_jax.quant import param_bytes, quantize_model, quantized_structure
from fineserve_jax.quant.awq import default_calibration
from fineserve_jax.quant.quality import jit_logits as logits
from fineserve_jax.quant.quality import logit_metrics, with_outlier_channels
from models.presets import REAL, TINY
from models.transformer import Transformer

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/quant_quality", "where to write quant_quality.json")
flags.DEFINE_list("models", ["tiny-llama", "llama-3.1-8b-widths"], "models to evaluate")
flags.DEFINE_list("presets", ["fp8", "int8", "awq", "qoq"],
                  "presets to compare with org (the *_kv8 presets share these weights)")
flags.DEFINE_integer("big_layers", 1, "layers of the real-size-shaped model")
flags.DEFINE_integer("big_vocab", 8192, "vocabulary of the real-size-shaped model")
flags.DEFINE_integer("eval_seqs", 4, "evaluation sequences (seeded random token ids)")
flags.DEFINE_integer("eval_len", 64, "evaluation sequence length")
flags.DEFINE_integer("calib_seqs", 4, "AWQ calibration sequences")
flags.DEFINE_integer("calib_len", 64, "AWQ calibration sequence length")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "activation / float dtype")
flags.DEFINE_integer("seed", 0, "weight seed")
flags.DEFINE_integer("outlier_channels", 8, "amplified residual channels (AWQ vs RTN)")
flags.DEFINE_float("outlier_gain", 20.0, "their gain in every RMSNorm weight")

# Seeds of the token sets: evaluation is held out from calibration.
EVAL_SEED, CALIB_SEED, OUTLIER_SEED = 1, 0, 2


def model_config(name: str, big_layers: int, big_vocab: int):
    """(evaluated config, full-size config for the byte ratios)."""
    if name in TINY:
        return TINY[name], TINY[name]
    if name == "llama-3.1-8b-widths":
        full = REAL["llama-3.1-8b"]
        return full.replace(num_layers=big_layers, vocab_size=big_vocab,
                            name=f"llama-3.1-8b-widths-{big_layers}L-v{big_vocab}"), full
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(TINY)}, llama-3.1-8b-widths")


def rtn_variant(name: str):
    """The preset without AWQ scales (plain round-to-nearest)."""
    return dataclasses.replace(get_preset(name), name=f"{name}-rtn", awq=False)


def byte_rows(cfg, full_cfg, presets: List[str]) -> Dict[str, dict]:
    """Stored bytes (bf16 deployment, abstract models) and KV bytes/token per preset."""
    out = {p: {} for p in ["org"] + presets}
    for key, c in (("", cfg), ("full_", full_cfg)):
        for p in out:
            s = quantized_structure(c, p)
            out[p].update({f"{key}param_bytes": param_bytes(s),
                           f"{key}linear_bytes": param_bytes(s, True),
                           f"{key}kv_bytes_per_token": KVFormat(
                               c.num_layers, c.num_kv_heads, c.head_dim,
                               get_preset(p).kv).bytes_per_token})
        for p in out:
            for what in ("param", "linear"):
                out[p][f"{key}{what}_ratio"] = (out[p][f"{key}{what}_bytes"]
                                                / out["org"][f"{key}{what}_bytes"])
    return out


def evaluate_model(name: str) -> dict:
    cfg, full_cfg = model_config(name, FLAGS.big_layers, FLAGS.big_vocab)
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
    t0 = time.time()
    org = Transformer(cfg, dtype=dt, rngs=nnx.Rngs(FLAGS.seed))
    ids = default_calibration(cfg.vocab_size, FLAGS.eval_seqs, FLAGS.eval_len, EVAL_SEED)
    calib = default_calibration(cfg.vocab_size, FLAGS.calib_seqs, FLAGS.calib_len, CALIB_SEED)
    ref = logits(org, ids)
    result = {"config": cfg.name, "full_config": full_cfg.name, "bytes": byte_rows(
        cfg, full_cfg, FLAGS.presets), "quality": {}, "awq_vs_rtn": {}}
    if dt == jnp.float32:  # bf16 rounding alone, for scale
        bf16 = Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(FLAGS.seed))
        result["quality"]["org-bf16"] = logit_metrics(ref, logits(bf16, ids))
        del bf16
    for p in FLAGS.presets:
        t = time.time()
        q = quantize_model(org, p, calibration=calib)
        result["quality"][p] = {**logit_metrics(ref, logits(q, ids)),
                                "seconds": time.time() - t}
        del q
    # AWQ vs RTN on the outlier-channel variant of the same weights
    outl = with_outlier_channels(org, FLAGS.outlier_channels, FLAGS.outlier_gain, OUTLIER_SEED)
    del org
    ref_o = logits(outl, ids)
    for base in [p for p in FLAGS.presets if get_preset(p).awq]:
        for pre in (rtn_variant(base), get_preset(base)):
            q = quantize_model(outl, pre, calibration=calib)
            result["awq_vs_rtn"][pre.name] = logit_metrics(ref_o, logits(q, ids))
            del q
    result["seconds"] = time.time() - t0
    return result


def print_tables(results: Dict[str, dict]) -> None:
    for name, r in results.items():
        print(f"\n== {r['config']} (bytes also for {r['full_config']}) ==")
        print(f"{'preset':<10}{'params MiB':>11}{'ratio':>7}{'linear':>8}{'full':>7}"
              f"{'full lin':>9}{'KV B/tok':>9}{'rel_err':>10}{'max_rel':>9}{'KL':>10}{'top1':>6}")
        for p in ["org-bf16"] + [k for k in r["bytes"] if k != "org"]:
            b = r["bytes"]["org" if p == "org-bf16" else p]
            m = r["quality"].get(p)
            if m is None:
                continue
            print(f"{p:<10}{b['param_bytes'] / 2**20:>11.2f}{b['param_ratio']:>7.3f}"
                  f"{b['linear_ratio']:>8.3f}{b['full_param_ratio']:>7.3f}"
                  f"{b['full_linear_ratio']:>9.3f}{b['kv_bytes_per_token']:>9d}"
                  f"{m['rel_err']:>10.4f}{m['max_rel']:>9.4f}{m['kl']:>10.2e}{m['top1']:>6.2f}")
        print(f"AWQ vs RTN, {FLAGS.outlier_channels} residual channels x{FLAGS.outlier_gain:g}:")
        for p, m in r["awq_vs_rtn"].items():
            print(f"  {p:<10} rel_err {m['rel_err']:.4f}  KL {m['kl']:.2e}  top1 {m['top1']:.2f}")


def main(_):
    results = {name: evaluate_model(name) for name in FLAGS.models}
    print_tables(results)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    path = os.path.join(FLAGS.output_dir, "quant_quality.json")
    meta = {"jax": jax.__version__, "backend": jax.default_backend(),
            "flags": {k: FLAGS[k].value for k in (
                "models", "presets", "big_layers", "big_vocab", "eval_seqs", "eval_len",
                "calib_seqs", "calib_len", "dtype", "seed", "outlier_channels",
                "outlier_gain")}}
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    app.run(main)

"""Measuring a quantized model against its float original (used by tests and experiments).

`logit_metrics` defines the error figures reported in WORKSPACE_NOTES.md, `perplexity` the
next-token perplexity of the quality report on real weights;
`with_outlier_channels` builds the "calibration-like" variant of a random-weight model:
real LLMs have a few residual channels of persistently large magnitude, which is what
makes activation-aware scaling pay off, and random initialisations do not.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def logit_metrics(ref: np.ndarray, test: np.ndarray) -> Dict[str, float]:
    """Errors of logits `test` against `ref`, both float [..., vocab]:

    rel_err  ||test - ref||_F / ||ref||_F over all elements
    max_rel  max |test - ref| / max |ref|
    kl       mean over positions of KL(softmax(ref) || softmax(test)), nats
    top1     fraction of positions whose argmax agrees
    """
    ref = np.asarray(ref, np.float64)
    test = np.asarray(test, np.float64)
    diff = test - ref

    def log_softmax(v):
        v = v - v.max(-1, keepdims=True)
        return v - np.log(np.exp(v).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(test)
    return {
        "rel_err": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
        "max_rel": float(np.abs(diff).max() / np.abs(ref).max()),
        "kl": float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
        "top1": float((ref.argmax(-1) == test.argmax(-1)).mean()),
    }


def perplexity(logits: np.ndarray, token_ids: np.ndarray) -> float:
    """exp(mean negative log-likelihood) of each row's next tokens: logits [B, T, vocab] of
    token_ids [B, T] (position t predicts token t + 1; the last position is unused)."""
    lg = np.asarray(logits, np.float64)[:, :-1]
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    target = np.asarray(token_ids)[:, 1:]
    nll = -np.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return float(np.exp(nll.mean()))


def int4_lattice_error(kernel, group: int = 32) -> float:
    """How far a kernel `[..., in, out]` is from llama.cpp's Q4_1 lattice: the largest
    |w - RTN(w)| / max |w| of int4 asymmetric round-to-nearest with a float minimum and step
    per `group` consecutive input rows (the float32 arithmetic of a Q4_1 dequantization).

    0.0 means every weight already lies on such a lattice (exactly when, as in Q4_1, the
    minimum and step are float16 numbers): the model was dequantized from a 4-bit GGUF, so an int4 format with these groups reproduces it exactly and any other int4
    format re-quantizes a 4-bit model (which is what the quality report then measures)."""
    w = np.asarray(kernel, np.float32)
    if w.ndim < 2 or w.shape[-2] % group:
        raise ValueError(f"kernel {w.shape}: the input dim (-2) must be a multiple of {group}")
    g = w.reshape(*w.shape[:-2], w.shape[-2] // group, group, w.shape[-1])
    lo, hi = g.min(axis=-2, keepdims=True), g.max(axis=-2, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / np.float32(15), np.float32(1))
    back = np.clip(np.round((g - lo) / step), 0, 15) * step + lo
    top = float(np.abs(w).max())
    return float(np.abs(back - g).max()) / top if top > 0 else 0.0


def jit_logits(module, token_ids) -> np.ndarray:
    """float32 logits [B, T, vocab] of a jitted full causal forward of `module`."""
    graphdef, state = nnx.split(module)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s).full_forward(x))
    return np.asarray(fwd(state, jnp.asarray(token_ids, jnp.int32)))


def with_outlier_channels(module, n: int = 8, gain: float = 20.0, seed: int = 2):
    """A copy of a `Transformer` whose RMSNorm weights (input and post-attention, every
    layer) are multiplied by `gain` on `n` residual channels chosen with `seed`, so the
    inputs of q/k/v and gate/up carry persistent large-magnitude channels."""
    cfg = module.config
    out = nnx.clone(module)
    channels = np.random.default_rng(seed).choice(cfg.hidden_size, n, replace=False)
    mult = np.ones(cfg.hidden_size, np.float32)
    mult[channels] = gain
    for norm in (out.layers.input_layernorm, out.layers.post_attention_layernorm):
        w = norm.weight[...]  # [num_layers, hidden]: every layer at once
        norm.weight.set_value((w.astype(jnp.float32) * mult).astype(w.dtype))
    return out

"""Post-training quantization of a float `Transformer` into a precision preset.

`quantize_model` replaces every projection `Linear` (q/k/v/o_proj, gate/up/down_proj) with
the preset's quantized layer from `models/quant_linear.py` (round-to-nearest, plus
AWQ-style scales for presets with `awq=True`, folded into the RMSNorm weights and the
preceding projections: `awq` module docstring; GPTQ rounding instead of round-to-nearest
for presets with `gptq=True`: `models.gptq`). Embeddings, RMSNorm weights and `lm_head`
stay in the model dtype: they are a small part of a large model's weights (lm_head is
~7% of Llama-3.1-8B) and the most sensitive to quantization; the paper's presets
(AWQ, QoQ, fp8 W8A8) keep them in 16 bits as well. The model code is unchanged; only the
projection containers differ.

Quantized models save with `checkpoint.save_params` and restore into
`quantized_structure(cfg, preset, dtype)` (see `restore_quantized`).
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fineserve_jax.formats import Preset, get_preset
from fineserve_jax.quant.calibration import calibration_ids
from fineserve_jax.quant.awq import (GROUPS, K_SITE, O_SITE, Q_SITE, UP_SITE, V_SITE,
                                     folds_o_into_v, smooths_keys, stored_scale_sites)
from fineserve_jax.quant.projections import PROJECTIONS, SITES, layer_path, projection_layers
from models.config import ModelConfig
from models.linear import Linear
from models.quant_linear import QuantLinear, layer_class
from models.stacking import stack_modules
from models.transformer import Transformer

log = logging.getLogger("fineserve_jax")
GPTQ_MAX_TOKENS = 2048  # calibration rows per projection input (every token of the text)
# GPTQ holds one [in, in] float32 Hessian per projection and layer on the host; past this the
# preset's default falls back to round-to-nearest (SmolLM2-135M needs 0.37 GiB, Llama-3.1-8B
# would need 30.5 GiB).
GPTQ_MAX_HESSIAN_BYTES = 2 << 30


def _stacked(act_scales: Mapping[str, np.ndarray], site: str, num_layers: int,
             width: int) -> np.ndarray:
    """act_scales[layers.{i}.<site>] for every layer, float32 [num_layers, width]."""
    rows = []
    for i in range(num_layers):
        path = layer_path(i, site)
        if path not in act_scales:
            raise ValueError(f"act_scales has no scale for {path}")
        v = np.asarray(act_scales[path], np.float32)
        if v.shape != (width,):
            raise ValueError(f"act_scales[{path!r}] must have shape ({width},), got {v.shape}")
        rows.append(v)
    return np.stack(rows)


def _awq_plan(module: Transformer, preset: Preset, act_scales: Mapping[str, np.ndarray],
              fold_scales: bool, key_scales: Optional[Mapping[str, np.ndarray]] = None,
              clips: Optional[Mapping[str, np.ndarray]] = None):
    """Where each AWQ scale goes (`awq` module docstring): returns
    (per site: {"act_scale" | "in_scale" | "out_scale": float32 [num_layers, n]},
     per RMSNorm attribute of the layer: the divisor of its weight, float32 [num_layers, d])."""
    cfg = module.config
    widths = {site: getattr(parent, name).in_features
              for site, parent, name in projection_layers(module)}
    scales = {site: _stacked(act_scales, site, cfg.num_layers, widths[site]) for site in SITES}
    stored = stored_scale_sites(preset, fold_scales)
    plan: Dict[str, Dict[str, np.ndarray]] = {site: {} for site in SITES}
    norms: Dict[str, np.ndarray] = {}
    for site in stored:
        plan[site]["act_scale"] = scales[site]
    for group in GROUPS:
        if group.sites[0] in stored:
            continue
        s = scales[group.sites[0]]
        for site in group.sites[1:]:
            if not np.array_equal(scales[site], s):
                raise ValueError(
                    f"AWQ scales of {', '.join(group.sites)} differ; they read one input, so "
                    f"folding needs one scale per group (awq.GROUPS): pass equal scales, or "
                    f"fold_scales=False to store each projection's own")
        for site in group.sites:
            plan[site]["in_scale"] = s
        if group.name == "attn_in":
            norms["input_layernorm"] = s
        elif group.name == "mlp_in":
            norms["post_attention_layernorm"] = s
        elif group.name == "mlp_out":
            plan[UP_SITE]["out_scale"] = s
        else:  # attn_out -> v_proj's columns: one scale per (KV head, dim)
            g = cfg.num_heads // cfg.num_kv_heads
            per_head = s.reshape(cfg.num_layers, cfg.num_kv_heads, g, cfg.head_dim)
            if not np.array_equal(per_head, np.broadcast_to(per_head[:, :, :1], per_head.shape)):
                raise ValueError(
                    f"{O_SITE}'s AWQ scale differs between query heads of one KV head; folding "
                    f"it into {V_SITE} needs it tied (awq.tie_heads), or fold_scales=False")
            plan[V_SITE]["out_scale"] = per_head[:, :, 0].reshape(cfg.num_layers, -1)
    if key_scales:  # SmoothAttention: k_proj's columns / lambda, q_proj's columns * lambda
        lam = _stacked(key_scales, K_SITE, cfg.num_layers, cfg.num_kv_heads * cfg.head_dim)
        g = cfg.num_heads // cfg.num_kv_heads
        per_q = np.repeat(lam.reshape(cfg.num_layers, cfg.num_kv_heads, 1, cfg.head_dim), g,
                          axis=2).reshape(cfg.num_layers, -1)
        plan[K_SITE]["out_scale"] = lam
        plan[Q_SITE]["out_scale"] = (1.0 / per_q).astype(np.float32)
    for site in SITES if clips else ():
        if layer_path(0, site) in clips:
            plan[site]["clip"] = np.stack([np.asarray(clips[layer_path(i, site)], np.float32)
                                           for i in range(cfg.num_layers)])
    return plan, norms


def _swap_projections(module: Transformer, preset: Preset,
                      plan: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """In place: each stacked projection `Linear` -> the preset's quantized layer, stacked
    the same way (every decoder layer quantized from its own slice, with its own AWQ scales
    `plan[site]`: act_scale / in_scale / out_scale [num_layers, n], see `QuantLinear`)."""
    cls = layer_class(preset.weights, preset.activations)
    for site, parent, name in projection_layers(module):
        lin = getattr(parent, name)
        if not isinstance(lin, Linear):
            raise ValueError(f"{site} is already quantized ({type(lin).__name__}); quantize "
                             f"a float model")
        bias = None if lin.bias is None else lin.bias[...]
        kw = {k: jnp.asarray(v, jnp.float32) for k, v in plan.get(site, {}).items()}

        def build(k, b, a, i, o, c, h):
            return cls(k, b, group_size=preset.group_size, act_scale=a, in_scale=i,
                       out_scale=o, clip=c, hessian=h)

        xs = (lin.kernel[...], bias, kw.get("act_scale"), kw.get("in_scale"),
              kw.get("out_scale"), kw.get("clip"), kw.get("hessian"))
        # one key per (layer class, group size): build is the same function for every site
        setattr(parent, name, stack_modules(build, xs, key=("quantize", cls, preset.group_size)))


def quantize_model(module: Transformer, preset: "Preset | str", calibration=None, *,
                   tokenizer=None, act_scales: Optional[Mapping[str, np.ndarray]] = None,
                   key_scales: Optional[Mapping[str, np.ndarray]] = None,
                   clips: Optional[Mapping[str, np.ndarray]] = None,
                   fold_scales: bool = True, gptq: Optional[bool] = None) -> Transformer:
    """A quantized copy of a float `Transformer` (the input module is left unchanged).

    preset: a `Preset` or its name (`fineserve_jax.formats.PRESETS`). Presets with bf16
    weights (`org`, KV-only presets) return `module` itself: KV quantization belongs to
    the KV arena, not to the parameters.
    calibration (presets with `awq=True`; ignored otherwise): None (the shipped natural
    calibration text, `quant.calibration`), a str (any text) or int token ids
    [n_seqs, seq_len]; text is tokenized with `tokenizer` (the model's own).
    act_scales: precomputed AWQ scales (per-layer path `layers.{i}.self_attn.q_proj` ->
    float32 [in], e.g. `awq.search_act_scales(...).scales`) instead of a calibration pass;
    only for `awq=True` presets.
    key_scales: SmoothAttention's key scales with `act_scales` (k_proj path -> float32
    [Hkv * D], `awq.search_act_scales(...).key_scales`); None: no key smoothing. Without
    act_scales they come from the calibration pass for presets that smooth keys
    (`awq.smooths_keys`: AWQ presets with a quantized KV cache).
    clips: AWQ's clipping ratios with `act_scales` (path -> float32 [G, out],
    `awq.search_act_scales(...).clips`); None: no clipping. Without act_scales they come
    from the calibration pass.
    fold_scales: fold the AWQ scales into the RMSNorm weights and the preceding projections
    (`awq` module docstring; the projections of a group need equal scales); False stores
    every projection's scale (`act_scale`, divided at runtime): the unfolded reference.
    gptq: round the weights by GPTQ on the calibration inputs (None: the preset's `gptq`,
    unless its Hessians would exceed `GPTQ_MAX_HESSIAN_BYTES` of host memory: then RTN).
    Without calibration and a tokenizer that can encode the default text there is nothing
    to calibrate on: the weights are rounded to nearest, and the log says so.
    """
    preset = get_preset(preset)
    cls = layer_class(preset.weights, preset.activations)
    if cls is None:
        return module
    extras = key_scales is not None or clips is not None
    if (act_scales is not None or extras) and not preset.awq:
        raise ValueError(f"act_scales/key_scales/clips given for preset {preset.name!r}, "
                         f"which has awq=False")
    if extras and act_scales is None:
        raise ValueError("key_scales and clips come with act_scales (all from "
                         "awq.search_act_scales)")
    plan, norms = {}, {}
    if preset.awq:
        if act_scales is None:
            from fineserve_jax.quant.awq import search_act_scales

            ids = calibration_ids(calibration, tokenizer, module.config.vocab_size)
            res = search_act_scales(
                module, cls, preset.group_size, ids,
                tie_o_heads=fold_scales and folds_o_into_v(preset),
                smooth_keys=smooths_keys(preset), clip=True)
            act_scales, key_scales, clips = res.scales, res.key_scales, res.clips
        plan, norms = _awq_plan(module, preset, act_scales, fold_scales, key_scales, clips)
    use_gptq = preset.gptq if gptq is None else bool(gptq)
    if use_gptq and gptq is None:
        need = gptq_hessian_bytes(module)
        if need > GPTQ_MAX_HESSIAN_BYTES:
            use_gptq = False
            log.info("%s: weights rounded to nearest, not by GPTQ: its Hessians would take "
                     "%.1f GiB of host memory (limit %.1f GiB; gptq=True forces it)",
                     preset.name, need / 2**30, GPTQ_MAX_HESSIAN_BYTES / 2**30)
    if use_gptq:
        try:
            ids = calibration_ids(calibration, tokenizer, module.config.vocab_size)
        except ValueError as e:
            if calibration is not None:  # the caller's own calibration is wrong: say so
                raise
            ids = None  # no tokenizer for the default text: nothing to calibrate on
            log.info("%s: weights rounded to nearest, not by GPTQ (%s)", preset.name, e)
        if ids is not None:
            for site, h in gptq_hessians(module, ids).items():
                plan.setdefault(site, {})["hessian"] = h
    out = nnx.clone(module)
    for name, s in norms.items():
        w = getattr(out.layers, name).weight
        inv = 1.0 / jnp.asarray(s, jnp.float32)  # multiply by the reciprocal: see QuantLinear
        w.set_value((w[...].astype(jnp.float32) * inv).astype(w[...].dtype))
    _swap_projections(out, preset, plan)
    return out


def gptq_hessian_bytes(module: Transformer) -> int:
    """Host bytes of `gptq_hessians(module, ...)`: float32 [num_layers, in, in] per scale
    group (`awq.GROUPS`: the projections that read one input share one Hessian)."""
    widths = {site: getattr(parent, name).in_features
              for site, parent, name in projection_layers(module)}
    return sum(4 * module.config.num_layers * widths[g.sites[0]] ** 2 for g in GROUPS)


def gptq_hessians(module: Transformer, ids: np.ndarray,
                  max_tokens: int = GPTQ_MAX_TOKENS) -> Dict[str, np.ndarray]:
    """Per projection site: `X^T X / N` of the float model's inputs X `[N, in]` to that
    projection in every layer, float32 `[num_layers, in, in]` (GPTQ's Hessian). The sites of
    one `awq.GROUPS` entry read the same input and get the same array."""
    from fineserve_jax.quant.awq import collect_projection_inputs

    x = collect_projection_inputs(module, ids, max_tokens=max_tokens)
    out = {}
    for group in GROUPS:
        layers = []
        for i in range(module.config.num_layers):
            xi = x[layer_path(i, group.sites[0])].astype(np.float64)
            layers.append((xi.T @ xi / xi.shape[0]).astype(np.float32))
        h = np.stack(layers)
        out.update({site: h for site in group.sites})
    return out


def quantized_structure(cfg: ModelConfig, preset: "Preset | str",
                        dtype="bfloat16", fold_scales: bool = True) -> Transformer:
    """The abstract (shape/dtype only, no memory) model `quantize_model` produces.

    Restore target for `checkpoint.restore_params`. `dtype` is the float dtype of the
    unquantized parameters (embeddings, norms, lm_head, biases). Folded AWQ scales change
    values, not structure; only `awq.stored_scale_sites` store an `act_scale`.
    """
    from fineserve_jax.checkpoint import parse_dtype

    preset = get_preset(preset)
    dt = parse_dtype(dtype)

    def build():
        m = Transformer(cfg, dtype=dt, rngs=nnx.Rngs(0))
        if layer_class(preset.weights, preset.activations) is not None:
            widths = {site: getattr(parent, name).in_features
                      for site, parent, name in projection_layers(m)}
            plan = {site: {"act_scale": np.ones((cfg.num_layers, widths[site]), np.float32)}
                    for site in stored_scale_sites(preset, fold_scales)}
            _swap_projections(m, preset, plan)
        return m

    return nnx.eval_shape(build)


def restore_quantized(cfg: ModelConfig, preset: "Preset | str", directory: str,
                      dtype="bfloat16", fold_scales: bool = True) -> Transformer:
    """Restore a quantized model saved by `checkpoint.save_params` (no PTQ, no calibration);
    `fold_scales` as the model was quantized with."""
    from fineserve_jax import checkpoint

    return checkpoint.restore_params(quantized_structure(cfg, preset, dtype, fold_scales),
                                     directory)


def _nbytes(x) -> int:
    return int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def param_bytes(module: nnx.Module, projections_only: bool = False) -> int:
    """Bytes of `nnx.Param` leaves (packing, scales, zeros, act_scale and biases included).

    Works on concrete and abstract (`nnx.eval_shape`) modules. With `projections_only`,
    only the q/k/v/o/gate/up/down layers (of every decoder layer) are counted.
    """
    if not projections_only:
        return sum(_nbytes(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
    return sum(_nbytes(x) for _, parent, name in projection_layers(module)
               for x in jax.tree.leaves(nnx.state(getattr(parent, name), nnx.Param)))


__all__ = ["PROJECTIONS", "QuantLinear", "layer_path", "param_bytes", "projection_layers",
           "quantize_model", "quantized_structure", "restore_quantized"]

"""AWQ-style activation-aware scaling (Lin et al., arXiv 2306.00978), searched per layer and
folded into the model.

Scale groups. In each decoder layer the projections that read the same input share one
input scale s [in] (AWQ's grouping); `GROUPS` lists them with where s goes:

  group     projections   their input                   s is folded into
  attn_in   q, k, v       input_layernorm(x)            input_layernorm.weight / s
  attn_out  o             attention output              v_proj's output columns (and bias) / s
  mlp_in    gate, up      post_attention_layernorm(h)   post_attention_layernorm.weight / s
  mlp_out   down          silu(gate(h)) * up(h)         up_proj's output columns / s

and the group's kernels are quantized as `W * s[:, None]`, so `(x / s) @ Q(W * s) ~= x @ W`
with the salient input channels quantized more finely, at no runtime cost. Why each fold is
exact in real arithmetic:
  - RMSNorm: `w * x / rms(x) / s == (w / s) * x / rms(x)`.
  - down: its input `silu(g) * u` is linear in u, so dividing up's output column c by s[c]
    divides down's input channel c by s[c].
  - o: query head j's attention output is a convex combination (softmax weights summing to
    1) of the V rows of its KV head kv(j) = j // (Hq / Hkv), so dividing V's channel
    (kv, d) by s divides channel d of every query head of that KV head. The scale is
    therefore *tied*: one value per (KV head, dim), repeated over the Hq / Hkv query heads
    of the group (the search pools the channel statistics the same way). The reference AWQ
    skips v -> o under GQA; the tie makes it valid. This fold changes what the KV cache
    stores, which is harmless when V is stored in float (bf16 rounding is scale-free) but
    not for an integer KV cache, whose per-row scale quantizes a V row as a whole:
    `folds_o_into_v` folds only for presets with a bf16 KV cache; otherwise o keeps a stored
    `act_scale` (divided at runtime, untied). (A reasoned choice; folding o into v under
    an integer KV cache was not measured.)

Search, per group: with the calibration inputs X [N, in] of the group and its float kernels
concatenated along the output dim, W [in, sum out]:

  m      = mean_n |X[n, :]|                                   (per input channel, [in])
  s(a)   = max(m ** a, 1e-4);  s(a) /= sqrt(max s(a) * min s(a))   (AWQ's normalisation)
  err(a) = mean( (Q_s(a)(X) - X @ W)^2 )   where Q_s is the *deployed* quantized layer built
           from W with input scale s
  a*     = argmin over the grid a in linspace(0, 1, n_grid) (ties: the smallest a)

Every format quantizes output columns independently (groups run along the input dim), so the
concatenated layer is exactly the group's layers side by side. a = 0 gives s = 1, plain
round-to-nearest, so on the calibration set the choice is never worse than RTN. Because err
uses the layer as served (for W4A8 it includes the per-token int8 activation quantization of
x / s), the search also balances weight against activation error (SmoothQuant's trade-off)
for `qoq`. Left out from the reference: the loss is the group's own output error, not the
whole block's (attention / MLP) output, and the scales come from mean |x| alone (no
weight-magnitude term, AutoAWQ's `duo_scaling`).

Clipping (`search_clip`, AWQ's second step): after the scales, each (input group, output
channel) of every projection but q/k is clipped to `ratio * [min, max]` with the ratio in
`CLIP_RATIOS` that minimizes that group's share of the output MSE on the calibration inputs.
On SmolLM2 it lowers KL to org but raises held-out perplexity (WORKSPACE_NOTES.md,
"Quantized presets on real weights"); it is on by default, as in the reference.

Calibration: token ids from `calibration.calibration_ids` (by default the shipped natural
text). The inputs are those each projection sees in a float forward of the whole model,
run one decoder layer at a time (`Transformer.layer`) with the projections of that layer
wrapped by a recorder. Scaling is an exact identity in float arithmetic, so the inputs of
later layers are the float model's (which is what AWQ's block-by-block pass feeds them too).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fineserve_jax.formats import Preset
from fineserve_jax.formats.kv_rotation import rotates_kv
from fineserve_jax.quant.projections import SITES, layer_path, projection_layers
from models.attention import CausalAttention
from models.compile_options import jit_with_options
from models.stacking import layer_slice

DEFAULT_MAX_TOKENS = 512  # rows of X per group used by the search
DEFAULT_GRID = 11  # alphas 0, 0.1, ..., 1.0
# Output columns used by the search. Every format quantizes output columns independently
# (groups run along the input dim; per-channel scales are per column), so a column subset
# gives exactly those columns' errors: an unbiased estimate of the loss at a fraction of the
# cost (a 14336-wide MLP projection is searched on 1024 columns, 14x cheaper on CPU).
DEFAULT_MAX_COLUMNS = 1024
SCALE_MIN = 1e-4  # AWQ's clamp: a dead channel must not get a zero scale


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Projections of a decoder layer that read one input and share its scale."""

    name: str
    sites: Tuple[str, ...]  # `projections.SITES` entries; they all see the same input


GROUPS = (
    ScaleGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleGroup("attn_out", ("self_attn.o_proj",)),
    ScaleGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleGroup("mlp_out", ("mlp.down_proj",)),
)
Q_SITE, K_SITE, V_SITE, O_SITE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                  "self_attn.o_proj")
UP_SITE, DOWN_SITE = "mlp.up_proj", "mlp.down_proj"
# AWQ's weight clipping search: shrink ratios of each (input group, output channel) range.
CLIP_RATIOS = tuple(float(r) for r in np.round(np.linspace(1.0, 0.5, 11), 4))
# Not clipped (as in the reference AWQ): the attention scores are sensitive to q/k outliers.
NO_CLIP_SITES = ("self_attn.q_proj", "self_attn.k_proj")
DEFAULT_CLIP_TOKENS = 256  # calibration rows used by the clipping search
# SmoothAttention's migration strength (QServe's 0.5; not swept here). On SmolLM2 with the
# int4 KV cache, key smoothing alone lowered qoq-RTN's perplexity ratio from 1.52 to 1.45;
# int4 KV rows are now stored Hadamard-rotated instead (`smooths_keys`).
KEY_SMOOTH_ALPHA = 0.5


def folds_o_into_v(preset: Preset) -> bool:
    """Whether o_proj's scale is folded into v_proj (a bf16 KV cache) or stored."""
    return preset.kv == "bf16"


def smooths_keys(preset: Preset) -> bool:
    """Whether keys are smoothed (SmoothAttention): AWQ-calibrated presets whose KV cache is
    quantized and not stored rotated. A rotated cache (int4, `formats.kv_rotation`) already
    spreads the key outliers; smoothing on top made SmolLM2's qoq worse (held-out perplexity
    ratio 1.28 rotated alone, 1.32 with both; WORKSPACE_NOTES.md)."""
    return preset.awq and preset.kv != "bf16" and not rotates_kv(preset.kv)


def stored_scale_sites(preset: Preset, fold_scales: bool = True) -> Tuple[str, ...]:
    """The projection sites whose layers store an `act_scale` (divided at runtime).

    None for RTN presets; every site with `fold_scales=False` (the unfolded form, kept as
    the reference the folding is tested against); otherwise only o_proj, and only when the
    KV cache is quantized (see `folds_o_into_v`)."""
    if not preset.awq:
        return ()
    if not fold_scales:
        return SITES
    return () if folds_o_into_v(preset) else (O_SITE,)


class _Tap(nnx.Module):
    """Wraps a projection during calibration and hands each input to `record`."""

    def __init__(self, inner, record):
        self.inner = inner
        self.record = record

    def __call__(self, x):
        self.record(x)
        return self.inner(x)


def collect_projection_inputs(module, calibration: np.ndarray,
                              max_tokens: int = DEFAULT_MAX_TOKENS,
                              skip_first: int = 0) -> Dict[str, np.ndarray]:
    """Inputs of every projection over a float forward: per-layer path -> float32 [N, in].

    calibration: int token ids [n_seqs, seq_len]. N = min(n_seqs * seq_len, max_tokens)
    rows, evenly spaced over all tokens (deterministic). Paths are `layers.{i}.<site>`
    (`projections.layer_path`). The module is not modified.
    """
    calibration = np.asarray(calibration)
    if calibration.ndim != 2 or not np.issubdtype(calibration.dtype, np.integer):
        raise ValueError(f"calibration must be int token ids [n_seqs, seq_len], got "
                         f"shape {calibration.shape} dtype {calibration.dtype}")
    vocab = module.config.vocab_size
    if calibration.size == 0 or calibration.min() < 0 or calibration.max() >= vocab:
        raise ValueError(f"calibration token ids must lie in [0, {vocab})")
    b, t = calibration.shape
    # Rows sampled evenly over all tokens but the first `skip_first` of each sequence.
    eligible = (np.arange(b)[:, None] * t + np.arange(skip_first, t)[None, :]).reshape(-1)
    if eligible.size == 0:
        raise ValueError(f"calibration sequences of {t} tokens have none past the first "
                         f"{skip_first}")
    n = eligible.size
    rows = eligible[np.unique(np.linspace(0, n - 1, min(n, max_tokens)).round().astype(np.int64))]
    ids = jnp.asarray(calibration, jnp.int32)
    x = module.embed(ids)
    rope = module.rope(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    inputs: Dict[str, np.ndarray] = {}
    graphdef, stacked = nnx.split(module.layers)
    for i in range(module.config.num_layers):
        x, seen = _layer_with_inputs(graphdef, stacked, x, rope, jnp.int32(i))
        for site, v in seen.items():
            inputs[layer_path(i, site)] = np.asarray(v, np.float32).reshape(-1, v.shape[-1])[rows]
    return inputs


@functools.partial(jit_with_options, static_argnums=(0,))
def _layer_with_inputs(graphdef, stacked, x, rope, index):
    """Float decoder layer `index` of the stacked layers (`nnx.split` of `module.layers`) on
    x [B, T, D]: (its output [B, T, D], {site: the input of that projection [B, T, in]}).
    One compiled program serves every layer; the slice and the taps are its own copies, so
    the model is left alone."""
    layer = layer_slice(nnx.merge(graphdef, stacked), index)
    seen = {}
    for site, parent, name in projection_layers(layer):
        setattr(parent, name, _Tap(getattr(parent, name),
                                   functools.partial(seen.__setitem__, site)))
    x, _ = layer(x, rope, index, CausalAttention(), None)
    return x, seen


def candidate_scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's s(alpha) [in] float32 from per-channel mean |x| [in]."""
    s = np.maximum(np.power(mean_abs.astype(np.float64), alpha), SCALE_MIN)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def tie_heads(mean_abs: np.ndarray, num_heads: int, num_kv_heads: int) -> np.ndarray:
    """Per-channel statistics of an attention output [Hq * D] pooled over the query heads of
    each KV head and repeated back: [Hq * D], equal across a KV head's query heads."""
    group = num_heads // num_kv_heads
    m = mean_abs.reshape(num_kv_heads, group, -1).mean(axis=1, keepdims=True)
    return np.repeat(m, group, axis=1).reshape(-1)


def key_smoothing_scales(k: np.ndarray, num_kv_heads: int, head_dim: int,
                         alpha: float = KEY_SMOOTH_ALPHA) -> np.ndarray:
    """SmoothAttention scales lambda float32 [Hkv * D] from calibration keys k [N, Hkv * D]
    (before RoPE): per KV head and rotary pair (i, i + D/2), lambda = (max over tokens of
    the pair's norm) ** alpha, the same for both channels of the pair. RoPE rotates each
    pair by an angle, which keeps its norm and commutes with scaling both channels alike, so
    `(q * lambda) . (k / lambda)` equals `q . k` after RoPE too."""
    half = head_dim // 2
    kk = np.asarray(k, np.float64).reshape(-1, num_kv_heads, 2, half)
    pair_max = np.sqrt(np.square(kk).sum(axis=2)).max(axis=0)  # [Hkv, D/2]
    lam = np.power(np.maximum(pair_max, SCALE_MIN), alpha)
    lam = lam / np.sqrt(lam.max() * lam.min())
    return np.concatenate([lam, lam], axis=-1).reshape(-1).astype(np.float32)


@functools.partial(jit_with_options, static_argnums=(0, 1))
def _output_mse(layer_cls, group_size, kernel, x, act_scale, target):
    """Mean squared error of the quantized layer's output against the float target."""
    y = layer_cls(kernel, None, group_size=group_size, act_scale=act_scale)(x)
    return jnp.mean(jnp.square(y.astype(jnp.float32) - target))


@functools.partial(jit_with_options, static_argnums=(0, 1))
def _group_errors(layer_cls, group_size, w, x, ratio):
    """Output MSE per (input group, output channel) of `w` [in, out] quantized with every
    group clipped at `ratio`, on inputs x [N, in]: [G, out] (cross-group terms ignored)."""
    g = w.shape[0] // group_size
    layer = layer_cls(w, None, group_size=group_size,
                      clip=jnp.full((g, w.shape[1]), ratio, jnp.float32))
    delta = (layer.dequantized_weight() - w).reshape(g, group_size, -1)
    part = jnp.einsum("ngk,gko->ngo", x.reshape(x.shape[0], g, group_size), delta,
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.mean(jnp.square(part), axis=0)


def search_clip(kernel: jax.Array, x: np.ndarray, layer_cls, group_size: int,
                scale: Optional[np.ndarray] = None, ratios=CLIP_RATIOS) -> np.ndarray:
    """AWQ's clipping search for one projection: the ratio in `ratios` [G, out] that
    minimizes each (input group, output channel)'s output MSE on the calibration inputs.

    kernel [in, out]; x float32 [N, in] the projection's float inputs; scale [in]: its AWQ
    input scale (the search runs on `kernel * scale` and `x / scale`, as quantized)."""
    from models.quant_linear import effective_group_size

    w = jnp.asarray(kernel, jnp.float32)
    xs = jnp.asarray(x, jnp.float32)
    if scale is not None:
        s = jnp.asarray(scale, jnp.float32)
        w, xs = w * s[:, None], xs * (1.0 / s)
    gs = effective_group_size(w.shape[0], group_size)
    errs = np.stack([np.asarray(_group_errors(layer_cls, gs, w, xs, float(r))) for r in ratios])
    return np.asarray(ratios, np.float32)[np.argmin(errs, axis=0)]


def search_act_scale(kernel: jax.Array, x: np.ndarray, layer_cls, group_size: int,
                     n_grid: int = DEFAULT_GRID, max_columns: Optional[int] = DEFAULT_MAX_COLUMNS,
                     mean_abs: Optional[np.ndarray] = None
                     ) -> Tuple[np.ndarray, float, float, float]:
    """Grid-search alpha for one projection (or a group's kernels side by side).

    kernel [in, out] (model dtype), x float32 [N, in] calibration inputs; mean_abs [in]: the
    channel statistics to build scales from (default: mean |x|; `tie_heads` for o_proj).
    Returns (act_scale float32 [in], alpha, rtn_mse, best_mse) on the calibration rows (and
    on `max_columns` evenly spaced output columns when out is wider; None: all columns).
    """
    out = kernel.shape[1]
    if max_columns is not None and out > max_columns:
        kernel = jnp.asarray(kernel)[:, np.linspace(0, out - 1, max_columns).round().astype(int)]
    x32 = jnp.asarray(x, jnp.float32)
    target = jnp.dot(x32, jnp.asarray(kernel, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    x_in = x32.astype(kernel.dtype)  # what the layer sees when served
    if mean_abs is None:
        mean_abs = np.abs(x).mean(axis=0)
    best = None
    rtn = None
    for alpha in np.linspace(0.0, 1.0, n_grid):
        s = candidate_scales(mean_abs, float(alpha))
        err = float(_output_mse(layer_cls, group_size, kernel, x_in, jnp.asarray(s), target))
        if rtn is None:
            rtn = err
        if best is None or err < best[2]:
            best = (s, round(float(alpha), 6), err)
    return best[0], best[1], rtn, best[2]


@dataclasses.dataclass
class AwqResult:
    """Per projection path (`layers.N.self_attn.q_proj`, ...): the chosen scale [in] f32, its
    alpha, and the calibration output MSE of plain RTN (alpha = 0) and of the choice. The
    projections of a scale group carry their group's values (the same scale array).
    key_scales: SmoothAttention's lambda [Hkv * D] per k_proj path (`smooth_keys`), else
    empty. clips: the clipping ratios [G, out] per path (`clip`; not for NO_CLIP_SITES)."""

    scales: Dict[str, np.ndarray]
    alphas: Dict[str, float]
    rtn_mse: Dict[str, float]
    awq_mse: Dict[str, float]
    key_scales: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    clips: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def search_act_scales(module, layer_cls, group_size: int, calibration: np.ndarray, *,
                      tie_o_heads: bool = True, smooth_keys: bool = False,
                      key_alpha: float = KEY_SMOOTH_ALPHA, clip: bool = False,
                      clip_tokens: int = DEFAULT_CLIP_TOKENS, n_grid: int = DEFAULT_GRID,
                      max_tokens: int = DEFAULT_MAX_TOKENS, skip_first: int = 0,
                      max_columns: Optional[int] = DEFAULT_MAX_COLUMNS) -> AwqResult:
    """AWQ scales for every scale group of every layer of a float `Transformer` (unchanged).

    calibration: int token ids [n_seqs, seq_len] (`calibration.calibration_ids`).
    layer_cls: the quantized layer the scales are searched for (e.g. `Int4Linear`).
    tie_o_heads: o_proj's scale tied across the query heads of each KV head (required to
    fold it into v_proj; see the module docstring). smooth_keys: also SmoothAttention's key
    scales (`key_smoothing_scales` with `key_alpha`) from the float keys of the calibration.
    clip: also the clipping ratios (`search_clip`, on `clip_tokens` of the rows).
    """
    cfg = module.config
    inputs = collect_projection_inputs(module, calibration, max_tokens, skip_first)
    kernels = {site: getattr(parent, name).kernel[...]  # [num_layers, in, out]
               for site, parent, name in projection_layers(module)}
    res = AwqResult({}, {}, {}, {})
    for group in GROUPS:
        for i in range(cfg.num_layers):
            x = inputs[layer_path(i, group.sites[0])]
            kernel = jnp.concatenate([kernels[s][i] for s in group.sites], axis=1)
            mean_abs = np.abs(x).mean(axis=0)
            if group.sites == (O_SITE,) and tie_o_heads:
                mean_abs = tie_heads(mean_abs, cfg.num_heads, cfg.num_kv_heads)
            s, alpha, rtn, best = search_act_scale(kernel, x, layer_cls, group_size, n_grid,
                                                   max_columns, mean_abs)
            for site in group.sites:
                path = layer_path(i, site)
                res.scales[path], res.alphas[path] = s, alpha
                res.rtn_mse[path], res.awq_mse[path] = rtn, best
    if clip:
        for site in SITES:
            if site in NO_CLIP_SITES:
                continue
            for i in range(cfg.num_layers):
                path = layer_path(i, site)
                x = inputs[path]
                x = x[np.unique(np.linspace(0, len(x) - 1, min(len(x), clip_tokens)).round()
                                .astype(np.int64))]
                res.clips[path] = search_clip(kernels[site][i], x, layer_cls, group_size,
                                              res.scales[path])
    if smooth_keys:
        k_proj = module.layers.self_attn.k_proj
        for i in range(cfg.num_layers):
            k = inputs[layer_path(i, K_SITE)] @ np.asarray(k_proj.kernel[i], np.float32)
            if k_proj.bias is not None:
                k = k + np.asarray(k_proj.bias[i], np.float32)
            res.key_scales[layer_path(i, K_SITE)] = key_smoothing_scales(
                k, cfg.num_kv_heads, cfg.head_dim, key_alpha)
    return res

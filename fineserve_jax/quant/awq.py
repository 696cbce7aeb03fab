"""AWQ-style activation-aware scaling (Lin et al., arXiv 2306.00978), searched per layer.

For a projection with float kernel W [in, out] and calibration inputs X [N, in]:

  m      = mean_n |X[n, :]|                                   (per input channel, [in])
  s(a)   = max(m ** a, 1e-4);  s(a) /= sqrt(max s(a) * min s(a))   (AWQ's normalisation)
  err(a) = mean( (Q_s(a)(X) - X @ W)^2 )   where Q_s is the *deployed* quantized layer built
           from W with act_scale s: it quantizes W * s[:, None] and divides x by s
  a*     = argmin over the grid a in linspace(0, 1, n_grid) (ties: the smallest a)

a = 0 gives s = 1, i.e. plain round-to-nearest, so on the calibration set the chosen
scale is never worse than RTN. Because err uses the layer exactly as served (for W4A8 it
includes the per-token int8 activation quantization of x / s), the search also balances
weight against activation error (SmoothQuant's trade-off) for `qoq`.

Differences from the reference AWQ implementation (stated, not hidden): scales are searched
per projection and stored in the layer (`act_scale`) rather than shared by q/k/v (and
gate/up) and folded into the preceding RMSNorm; the loss is the projection's own output
error, not the whole attention block's; there is no weight-clipping search.

Calibration inputs are the inputs each projection sees in a float forward of the whole
model over the calibration token ids (recorded by temporarily wrapping the projections).
Scaling is an exact identity in float arithmetic, so the inputs of later layers are the
float model's (which is what AWQ's block-by-block pass feeds them as well).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fineserve_jax.quant.projections import projection_layers

# Default calibration when none is given: uniform random token ids (seeded, so quantizing
# the same checkpoint twice gives bit-identical weights). Real text is better; random ids
# still exercise every projection with the model's own activation statistics.
DEFAULT_CALIBRATION_SEQS = 8
DEFAULT_CALIBRATION_LEN = 64
DEFAULT_CALIBRATION_SEED = 0
DEFAULT_MAX_TOKENS = 512  # rows of X per projection used by the search
DEFAULT_GRID = 11  # alphas 0, 0.1, ..., 1.0
# Output columns used by the search. Every format quantizes output columns independently
# (groups run along the input dim; per-channel scales are per column), so a column subset
# gives exactly those columns' errors: an unbiased estimate of the loss at a fraction of the
# cost (a 14336-wide MLP projection is searched on 1024 columns, 14x cheaper on CPU).
DEFAULT_MAX_COLUMNS = 1024
SCALE_MIN = 1e-4  # AWQ's clamp: a dead channel must not get a zero scale


def default_calibration(vocab_size: int, n_seqs: int = DEFAULT_CALIBRATION_SEQS,
                        seq_len: int = DEFAULT_CALIBRATION_LEN,
                        seed: int = DEFAULT_CALIBRATION_SEED) -> np.ndarray:
    """Token ids int32 [n_seqs, seq_len], uniform in [0, vocab_size), from `seed`."""
    return np.random.default_rng(seed).integers(0, vocab_size, (n_seqs, seq_len), dtype=np.int32)


class _Tap(nnx.Module):
    """Wraps a projection during calibration and hands each input to `record`."""

    def __init__(self, inner, record):
        self.inner = inner
        self.record = record

    def __call__(self, x):
        self.record(x)
        return self.inner(x)


def collect_projection_inputs(module, calibration: np.ndarray,
                              max_tokens: int = DEFAULT_MAX_TOKENS) -> Dict[str, np.ndarray]:
    """Inputs of every projection over a float forward: path -> float32 [N, in].

    calibration: int token ids [n_seqs, seq_len]. N = min(n_seqs * seq_len, max_tokens)
    rows, evenly spaced over all tokens (deterministic). The module is restored afterwards.
    """
    calibration = np.asarray(calibration)
    if calibration.ndim != 2 or not np.issubdtype(calibration.dtype, np.integer):
        raise ValueError(f"calibration must be int token ids [n_seqs, seq_len], got "
                         f"shape {calibration.shape} dtype {calibration.dtype}")
    vocab = module.config.vocab_size
    if calibration.size == 0 or calibration.min() < 0 or calibration.max() >= vocab:
        raise ValueError(f"calibration token ids must lie in [0, {vocab})")
    n = calibration.size
    rows = np.unique(np.linspace(0, n - 1, min(n, max_tokens)).round().astype(np.int64))
    inputs: Dict[str, np.ndarray] = {}

    def recorder(path):
        def record(x):
            x = np.asarray(jnp.asarray(x, jnp.float32)).reshape(-1, x.shape[-1])
            inputs[path] = x[rows]
        return record

    sites = list(projection_layers(module))
    originals = [getattr(parent, name) for _, parent, name in sites]
    try:
        for (path, parent, name), layer in zip(sites, originals):
            setattr(parent, name, _Tap(layer, recorder(path)))
        module.full_forward(jnp.asarray(calibration, jnp.int32))
    finally:
        for (_, parent, name), layer in zip(sites, originals):
            setattr(parent, name, layer)
    return inputs


def candidate_scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's s(alpha) [in] float32 from per-channel mean |x| [in]."""
    s = np.maximum(np.power(mean_abs.astype(np.float64), alpha), SCALE_MIN)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _output_mse(layer_cls, group_size, kernel, x, act_scale, target):
    """Mean squared error of the quantized layer's output against the float target."""
    y = layer_cls(kernel, None, group_size=group_size, act_scale=act_scale)(x)
    return jnp.mean(jnp.square(y.astype(jnp.float32) - target))


def search_act_scale(kernel: jax.Array, x: np.ndarray, layer_cls, group_size: int,
                     n_grid: int = DEFAULT_GRID, max_columns: Optional[int] = DEFAULT_MAX_COLUMNS
                     ) -> Tuple[np.ndarray, float, float, float]:
    """Grid-search alpha for one projection.

    kernel [in, out] (model dtype), x float32 [N, in] calibration inputs. Returns
    (act_scale float32 [in], alpha, rtn_mse, best_mse) on the calibration rows (and on
    `max_columns` evenly spaced output columns when out is wider; None: all columns).
    """
    out = kernel.shape[1]
    if max_columns is not None and out > max_columns:
        kernel = jnp.asarray(kernel)[:, np.linspace(0, out - 1, max_columns).round().astype(int)]
    x32 = jnp.asarray(x, jnp.float32)
    target = jnp.dot(x32, jnp.asarray(kernel, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    x_in = x32.astype(kernel.dtype)  # what the layer sees when served
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
    """Per projection path (`layers.N.self_attn.q_proj`, ...): the chosen scale [in] f32,
    its alpha, and the calibration output MSE of plain RTN (alpha = 0) and of the choice."""

    scales: Dict[str, np.ndarray]
    alphas: Dict[str, float]
    rtn_mse: Dict[str, float]
    awq_mse: Dict[str, float]


def search_act_scales(module, layer_cls, group_size: int,
                      calibration: Optional[np.ndarray] = None, *,
                      n_grid: int = DEFAULT_GRID,
                      max_tokens: int = DEFAULT_MAX_TOKENS,
                      max_columns: Optional[int] = DEFAULT_MAX_COLUMNS) -> AwqResult:
    """AWQ scales for every projection of a float `Transformer` (left unchanged).

    calibration: int token ids [n_seqs, seq_len]; None -> `default_calibration(vocab)`.
    layer_cls: the quantized layer the scales are searched for (e.g. `Int4Linear`).
    """
    if calibration is None:
        calibration = default_calibration(module.config.vocab_size)
    inputs = collect_projection_inputs(module, calibration, max_tokens)
    res = AwqResult({}, {}, {}, {})
    for path, parent, name in projection_layers(module):
        kernel = getattr(parent, name).kernel[...]
        s, alpha, rtn, best = search_act_scale(kernel, inputs[path], layer_cls, group_size,
                                               n_grid, max_columns)
        res.scales[path], res.alphas[path] = s, alpha
        res.rtn_mse[path], res.awq_mse[path] = rtn, best
    return res

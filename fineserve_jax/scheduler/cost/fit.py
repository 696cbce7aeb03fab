"""Fitting step-time coefficients to profile points.

Model (per profiled group = (model, qformat, tp, mps_percentage)):

    prefill_time(T, B, C) = a + b * T + c * T * (C + T / (2 B))
        T = prompt tokens in the batch, B = sequences, C = tokens already cached per
        sequence (0 for a fresh prompt). The last term is causal attention work.
    decode_time(B, C)     = d + e * B + f * B * C
        one decode step (one token for each of B sequences), C = mean context length.

a and d are the weight-read / launch floor, b and e the per-token GEMM work, c and f the
attention / KV-read work (geometry.py says what each stands for). Coefficients are fitted by
non-negative least squares on relative error (each point weighted by 1/y, since times span
0.01 s .. 7 s), so every coefficient is >= 0 and predictions are >= 0 and non-decreasing in
T, B and C.

Several sources (machines) profile overlapping groups; `calibration_ratios` measures how much
slower one is than another on the groups both profile.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

from fineserve_jax.scheduler.cost.profiles import ProfilePoint


def prefill_features(num_tokens, batch_size, context) -> np.ndarray:
    """[..., 3] features (1, T, T (C + T / 2B)) of the prefill model."""
    T = np.asarray(num_tokens, dtype=np.float64)
    B = np.maximum(np.asarray(batch_size, dtype=np.float64), 1.0)
    C = np.asarray(context, dtype=np.float64)
    return np.stack(np.broadcast_arrays(np.ones_like(T), T, T * (C + T / (2.0 * B))), axis=-1)


def decode_features(batch_size, context) -> np.ndarray:
    """[..., 3] features (1, B, B C) of the decode model."""
    B = np.asarray(batch_size, dtype=np.float64)
    C = np.asarray(context, dtype=np.float64)
    return np.stack(np.broadcast_arrays(np.ones_like(B), B, B * C), axis=-1)


def nnls_relative(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin_{beta >= 0} sum(((X beta - y) / y)^2), exact for few columns (subset search).

    Among (near-)equal residuals the subset with fewer columns wins.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if np.any(y <= 0):
        raise ValueError("times to fit must be positive")
    Xw, yw = X / y[:, None], np.ones_like(y)
    k = X.shape[1]
    best, best_res = np.zeros(k), float(np.sum(yw ** 2))
    for r in range(1, k + 1):
        for cols in itertools.combinations(range(k), r):
            sub = Xw[:, cols]
            if np.linalg.matrix_rank(sub) < r:
                continue
            beta, *_ = np.linalg.lstsq(sub, yw, rcond=None)
            if np.any(beta < 0):
                continue
            full = np.zeros(k)
            full[list(cols)] = beta
            res = float(np.sum((Xw @ full - yw) ** 2))
            if res < best_res * (1 - 1e-9) - 1e-15:
                best, best_res = full, res
    return best


@dataclasses.dataclass
class GroupFit:
    """Fitted coefficients of one (model, qformat, tp, mps) group and its fit quality."""

    model: str
    qformat: str
    tp: int
    mps: int
    prefill_coef: np.ndarray  # [a, b, c]
    decode_coef: np.ndarray  # [d, e, f]
    source: str = ""
    batch_range: Tuple[float, float] = (1.0, 1.0)
    tokens_range: Tuple[float, float] = (1.0, 1.0)  # prompt tokens per sequence
    context_range: Tuple[float, float] = (0.0, 0.0)  # decode context
    n_points: int = 0
    prefill_mape: float = float("nan")
    prefill_max_rel: float = float("nan")
    decode_mape: float = float("nan")
    decode_max_rel: float = float("nan")
    prefill_loo_mape: float = float("nan")
    decode_loo_mape: float = float("nan")

    @property
    def key(self):
        return (self.model, self.qformat, self.tp, self.mps)

    def report(self) -> Dict[str, Any]:
        return {
            "model": self.model, "qformat": self.qformat, "tp": self.tp, "mps": self.mps,
            "source": self.source, "n_points": self.n_points,
            "prefill_coef": [float(x) for x in self.prefill_coef],
            "decode_coef": [float(x) for x in self.decode_coef],
            "prefill_mape": self.prefill_mape, "prefill_max_rel": self.prefill_max_rel,
            "prefill_loo_mape": self.prefill_loo_mape,
            "decode_mape": self.decode_mape, "decode_max_rel": self.decode_max_rel,
            "decode_loo_mape": self.decode_loo_mape,
        }


def _rel_errors(X, y, beta):
    return np.abs(X @ beta - y) / y


def _loo_mape(X, y) -> float:
    """Leave-one-out mean relative error (nan below 3 points)."""
    n = len(y)
    if n < 3:
        return float("nan")
    errs = []
    for i in range(n):
        m = np.arange(n) != i
        beta = nnls_relative(X[m], y[m])
        errs.append(abs(X[i] @ beta - y[i]) / y[i])
    return float(np.mean(errs))


def fit_group(points: Sequence[ProfilePoint], loo: bool = True) -> GroupFit:
    """Fit one group's prefill and decode coefficients (see the module docstring)."""
    if not points:
        raise ValueError("no points to fit")
    keys = {p.key for p in points}
    if len(keys) != 1:
        raise ValueError(f"points of several groups given to fit_group: {sorted(keys)}")
    model, qformat, tp, mps = next(iter(keys))
    B = np.array([p.batch_size for p in points], dtype=np.float64)
    L = np.array([p.input_len for p in points], dtype=np.float64)
    O = np.array([p.output_len for p in points], dtype=np.float64)
    Xp = prefill_features(B * L, B, 0.0)
    yp = np.array([p.prefill_time for p in points], dtype=np.float64)
    C = L + O / 2.0
    Xd = decode_features(B, C)
    yd = np.array([p.tpot for p in points], dtype=np.float64)
    bp = nnls_relative(Xp, yp)
    bd = nnls_relative(Xd, yd)
    ep, ed = _rel_errors(Xp, yp, bp), _rel_errors(Xd, yd, bd)
    sources = sorted({p.source for p in points})
    return GroupFit(
        model, qformat, tp, mps, bp, bd, source="+".join(sources),
        batch_range=(float(B.min()), float(B.max())),
        tokens_range=(float(L.min()), float(L.max())),
        context_range=(float(C.min()), float(C.max())),
        n_points=len(points),
        prefill_mape=float(ep.mean()), prefill_max_rel=float(ep.max()),
        decode_mape=float(ed.mean()), decode_max_rel=float(ed.max()),
        prefill_loo_mape=_loo_mape(Xp, yp) if loo else float("nan"),
        decode_loo_mape=_loo_mape(Xd, yd) if loo else float("nan"),
    )


def fit_points(points: Iterable[ProfilePoint], loo: bool = True) -> Dict[Tuple, GroupFit]:
    """Every group's fit, keyed by (model, qformat, tp, mps)."""
    groups: Dict[Tuple, List[ProfilePoint]] = {}
    for p in points:
        groups.setdefault(p.key, []).append(p)
    return {k: fit_group(v, loo=loo) for k, v in sorted(groups.items())}


def calibration_ratios(ref: Mapping[Tuple, GroupFit], other: Mapping[Tuple, GroupFit]):
    """(prefill ratio, decode ratio, common groups): the median over groups both sources fit
    of ref/other predictions at the other group's range corners; (1, 1, 0) if none."""
    rp, rd = [], []
    for k, g in other.items():
        r = ref.get(k)
        if r is None:
            continue
        Bs = [g.batch_range[0], g.batch_range[1]]
        Ls = [g.tokens_range[0], g.tokens_range[1]]
        Cs = [g.context_range[0], g.context_range[1]]
        for b in Bs:
            for L in Ls:
                x = prefill_features(b * L, b, 0.0)
                po = float(x @ g.prefill_coef)
                if po > 0:
                    rp.append(float(x @ r.prefill_coef) / po)
            for c in Cs:
                x = decode_features(b, c)
                do = float(x @ g.decode_coef)
                if do > 0:
                    rd.append(float(x @ r.decode_coef) / do)
    n = len({k for k in other if k in ref})
    if not n:
        return 1.0, 1.0, 0
    return float(np.median(rp)), float(np.median(rd)), n

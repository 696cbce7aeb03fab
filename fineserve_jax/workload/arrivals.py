"""Arrival processes and per-model rates. Pure Python + numpy, seeded.

- `poisson`: exponential inter-arrival gaps with mean 1/rate (CV = 1).
- `gamma`: Gamma(shape=1/cv^2, scale=cv^2/rate) gaps: mean 1/rate, coefficient of variation
  `cv` (cv > 1 is burstier than Poisson, cv < 1 smoother; cv == 1 is Poisson in law).
- `power_law_rates`: weight_i = (i+1)^-alpha over models in the given order, scaled so the
  first (top) model gets `top_rate`, or so that the rates sum to `total_rate`.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

ARRIVAL_PROCESSES = ("poisson", "gamma")


def check_process(process: str, cv: float = 1.0) -> str:
    if process not in ARRIVAL_PROCESSES:
        raise ValueError(
            f"unknown arrival process {process!r}; valid: {', '.join(ARRIVAL_PROCESSES)}"
        )
    if process == "gamma" and not (cv > 0 and math.isfinite(cv)):
        raise ValueError(f"gamma arrivals need a positive finite cv, got {cv!r}")
    return process


def inter_arrival_gaps(
    rng: np.random.Generator, rate: float, n: int, process: str = "poisson", cv: float = 1.0
) -> np.ndarray:
    """`n` inter-arrival gaps (seconds) of a renewal process with mean rate `rate` req/s."""
    check_process(process, cv)
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"arrival rate must be positive and finite, got {rate!r}")
    if n < 0:
        raise ValueError(f"number of gaps must be >= 0, got {n}")
    if process == "poisson":
        return rng.exponential(1.0 / rate, size=n)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (rate * shape), size=n)


def arrival_times(
    rng: np.random.Generator,
    rate: float,
    *,
    duration_s: Optional[float] = None,
    num: Optional[int] = None,
    process: str = "poisson",
    cv: float = 1.0,
    start_s: float = 0.0,
) -> np.ndarray:
    """Arrival times of one stream, starting after `start_s`.

    Exactly one of `duration_s` (all arrivals in [start_s, start_s + duration_s)) or `num`
    (the first `num` arrivals) must be given. A zero rate yields no arrivals.
    """
    if (duration_s is None) == (num is None):
        raise ValueError("give exactly one of duration_s or num")
    if rate == 0:
        return np.zeros(0)
    if num is not None:
        return start_s + np.cumsum(inter_arrival_gaps(rng, rate, int(num), process, cv))
    if duration_s < 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s}")
    out: List[np.ndarray] = []
    t = start_s
    end = start_s + duration_s
    # Draw in chunks sized to the expected count (+ 6 sigma-ish slack), until past the end.
    chunk = max(16, int(rate * duration_s * 1.2 + 6 * math.sqrt(rate * duration_s + 1) * max(cv, 1.0)))
    while True:
        ts = t + np.cumsum(inter_arrival_gaps(rng, rate, chunk, process, cv))
        if ts[-1] >= end:
            out.append(ts[ts < end])
            break
        out.append(ts)
        t = float(ts[-1])
    return np.concatenate(out) if out else np.zeros(0)


def power_law_weights(n: int, alpha: float) -> np.ndarray:
    """weight_i = (i+1)^-alpha for i in 0..n-1 (the top model has weight 1)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    return np.arange(1, n + 1, dtype=np.float64) ** (-float(alpha))


def power_law_rates(
    models: Union[int, Sequence[str]],
    alpha: float,
    *,
    top_rate: Optional[float] = None,
    total_rate: Optional[float] = None,
) -> Union[Dict[str, float], List[float]]:
    """Per-model rates following a power law over the models' order.

    Give exactly one of `top_rate` (rate of the first model; rate_i = top_rate * w_i) or
    `total_rate` (rates sum to it; rate_i = total_rate * w_i / sum(w)). Returns a dict
    name -> rate when `models` is a sequence of names, a list when it is a count.
    """
    if (top_rate is None) == (total_rate is None):
        raise ValueError("give exactly one of top_rate or total_rate")
    names = None if isinstance(models, int) else list(models)
    n = models if names is None else len(names)
    if names is not None and len(set(names)) != len(names):
        raise ValueError(f"duplicate model names in {names}")
    w = power_law_weights(n, alpha)
    scale = float(top_rate) if top_rate is not None else (
        float(total_rate) / float(w.sum()) if n else 0.0
    )
    if scale < 0:
        raise ValueError("rates must be >= 0")
    rates = [float(x) for x in w * scale]
    return rates if names is None else dict(zip(names, rates))


def empirical_cv(times: Sequence[float]) -> float:
    """Coefficient of variation of the inter-arrival gaps of sorted `times` (NaN if < 3)."""
    t = np.asarray(times, dtype=np.float64)
    if t.size < 3:
        return float("nan")
    g = np.diff(t)
    m = g.mean()
    return float(g.std() / m) if m > 0 else float("nan")

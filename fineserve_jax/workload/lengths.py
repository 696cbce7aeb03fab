"""Prompt and output length distributions. Pure Python + numpy.

`LengthDist` is an immutable value; `.sample(rng, n)` returns int64 lengths in [lo, hi].

Kinds:
  fixed(v)                       always v
  uniform(lo, hi)                integers uniform on [lo, hi] (both inclusive)
  lognormal(mean, sigma, lo, hi) round(exp(mu + sigma Z)) clipped to [lo, hi]; mu is solved
                                 so that the *clipped* distribution has mean `mean`
                                 (before rounding, which is unbiased to < 0.5 token)
  empirical(values)              resample the given values uniformly (clipped to [lo, hi])

Named presets (means from the MuxServe paper; sigmas are our assumption, the sources publish
means only, documented in WORKSPACE_NOTES.md):
  "sharegpt": prompt mean 161, output mean 338 (lognormal sigma 1.0 / 0.9, clipped [1, 2048])
  "lmsys":    prompt mean 100, output mean 261 (lognormal sigma 1.0 / 0.9, clipped [1, 2048])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np

LENGTH_KINDS = ("fixed", "uniform", "lognormal", "empirical")


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[clip(exp(mu + sigma Z), lo, hi)] for Z ~ N(0, 1)."""
    if sigma == 0:
        return min(max(math.exp(mu), lo), hi)
    la = (math.log(lo) - mu) / sigma if lo > 0 else -math.inf
    lb = (math.log(hi) - mu) / sigma if math.isfinite(hi) else math.inf
    p_lo = _phi(la) if math.isfinite(la) else 0.0
    p_hi = 1.0 - _phi(lb) if math.isfinite(lb) else 0.0
    inner = math.exp(mu + 0.5 * sigma * sigma) * (
        (_phi(lb - sigma) if math.isfinite(lb) else 1.0)
        - (_phi(la - sigma) if math.isfinite(la) else 0.0)
    )
    return lo * p_lo + (hi * p_hi if math.isfinite(hi) else 0.0) + inner


def solve_lognormal_mu(mean: float, sigma: float, lo: float, hi: float) -> float:
    """mu such that the clipped lognormal has the given mean (bisection)."""
    if not (lo < mean < hi):
        raise ValueError(f"target mean {mean} must lie strictly inside ({lo}, {hi})")
    a, b = math.log(max(lo, 1e-9)) - 10 * sigma - 10, math.log(mean) + 1.0
    while clipped_lognormal_mean(b, sigma, lo, hi) < mean:
        b += 2.0
    for _ in range(200):
        m = 0.5 * (a + b)
        if clipped_lognormal_mean(m, sigma, lo, hi) < mean:
            a = m
        else:
            b = m
    return 0.5 * (a + b)


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A distribution over positive integer token counts."""

    kind: str
    lo: int = 1
    hi: int = 1 << 31
    value: int = 0  # fixed
    mean_target: float = 0.0  # lognormal
    sigma: float = 0.0  # lognormal
    mu: float = 0.0  # lognormal (derived)
    values: Tuple[int, ...] = ()  # empirical

    def __post_init__(self):
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"unknown length distribution {self.kind!r}; valid: {LENGTH_KINDS}")
        if self.lo < 1 or self.hi < self.lo:
            raise ValueError(f"length bounds must satisfy 1 <= lo <= hi, got [{self.lo}, {self.hi}]")

    # -- constructors --
    @classmethod
    def fixed(cls, value: int) -> "LengthDist":
        value = int(value)
        if value < 1:
            raise ValueError(f"fixed length must be >= 1, got {value}")
        return cls("fixed", lo=value, hi=value, value=value)

    @classmethod
    def uniform(cls, lo: int, hi: int) -> "LengthDist":
        return cls("uniform", lo=int(lo), hi=int(hi))

    @classmethod
    def lognormal(cls, mean: float, sigma: float = 1.0, lo: int = 1, hi: int = 2048) -> "LengthDist":
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        mu = solve_lognormal_mu(float(mean), float(sigma), float(lo), float(hi)) if sigma > 0 else math.log(mean)
        return cls("lognormal", lo=int(lo), hi=int(hi), mean_target=float(mean), sigma=float(sigma), mu=mu)

    @classmethod
    def empirical(cls, values: Sequence[int], lo: int = 1, hi: Optional[int] = None) -> "LengthDist":
        vals = tuple(int(v) for v in values)
        if not vals:
            raise ValueError("empirical length distribution needs at least one value")
        hi = max(vals) if hi is None else int(hi)
        return cls("empirical", lo=int(lo), hi=max(hi, int(lo)), values=vals)

    # -- use --
    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` lengths as int64, each in [lo, hi]."""
        n = int(n)
        if self.kind == "fixed":
            out = np.full(n, self.value, dtype=np.int64)
        elif self.kind == "uniform":
            out = rng.integers(self.lo, self.hi + 1, size=n, dtype=np.int64)
        elif self.kind == "lognormal":
            x = np.exp(self.mu + self.sigma * rng.standard_normal(n))
            out = np.rint(x).astype(np.int64)
        else:
            out = np.asarray(self.values, dtype=np.int64)[rng.integers(0, len(self.values), size=n)]
        return np.clip(out, self.lo, self.hi)

    def mean(self) -> float:
        """Expected value (lognormal: of the clipped continuous value, before rounding)."""
        if self.kind == "fixed":
            return float(self.value)
        if self.kind == "uniform":
            return 0.5 * (self.lo + self.hi)
        if self.kind == "lognormal":
            return clipped_lognormal_mean(self.mu, self.sigma, self.lo, self.hi)
        return float(np.clip(np.asarray(self.values), self.lo, self.hi).mean())


@dataclasses.dataclass(frozen=True)
class RequestLengths:
    """Prompt and output length distributions of one workload (or one model's requests)."""

    prompt: LengthDist
    output: LengthDist

    def sample(self, rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.prompt.sample(rng, n), self.output.sample(rng, n)


SHAREGPT_MEANS = (161.0, 338.0)
LMSYS_MEANS = (100.0, 261.0)
PROMPT_SIGMA = 1.0
OUTPUT_SIGMA = 0.9
MAX_LEN = 2048


def sharegpt(max_len: int = MAX_LEN) -> RequestLengths:
    return RequestLengths(
        LengthDist.lognormal(SHAREGPT_MEANS[0], PROMPT_SIGMA, 1, max_len),
        LengthDist.lognormal(SHAREGPT_MEANS[1], OUTPUT_SIGMA, 1, max_len),
    )


def lmsys(max_len: int = MAX_LEN) -> RequestLengths:
    return RequestLengths(
        LengthDist.lognormal(LMSYS_MEANS[0], PROMPT_SIGMA, 1, max_len),
        LengthDist.lognormal(LMSYS_MEANS[1], OUTPUT_SIGMA, 1, max_len),
    )


def fixed_lengths(prompt_len: int, output_len: int) -> RequestLengths:
    return RequestLengths(LengthDist.fixed(prompt_len), LengthDist.fixed(output_len))


LENGTH_PRESETS = {"sharegpt": sharegpt, "lmsys": lmsys}

LengthsLike = Union[None, str, RequestLengths, Tuple[int, int], Tuple[LengthDist, LengthDist]]


def as_lengths(spec: LengthsLike) -> RequestLengths:
    """Accept None (sharegpt), a preset name, a (prompt, output) pair of ints or LengthDists."""
    if spec is None:
        return sharegpt()
    if isinstance(spec, RequestLengths):
        return spec
    if isinstance(spec, str):
        if spec.startswith("fixed:"):
            try:
                p, o = (int(x) for x in spec[len("fixed:"):].split(","))
            except ValueError:
                raise ValueError(f"bad fixed length spec {spec!r}; expected 'fixed:PROMPT,OUTPUT'") from None
            return fixed_lengths(p, o)
        try:
            return LENGTH_PRESETS[spec]()
        except KeyError:
            raise ValueError(
                f"unknown length preset {spec!r}; valid: {', '.join(LENGTH_PRESETS)} or 'fixed:P,O'"
            ) from None
    if isinstance(spec, tuple) and len(spec) == 2:
        p, o = spec
        p = p if isinstance(p, LengthDist) else LengthDist.fixed(p)
        o = o if isinstance(o, LengthDist) else LengthDist.fixed(o)
        return RequestLengths(p, o)
    raise TypeError(f"cannot interpret {spec!r} as request lengths")

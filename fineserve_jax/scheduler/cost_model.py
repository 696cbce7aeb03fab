"""Step-time cost model: prefill and decode latency per (model, precision preset, TP size).

Pure Python + numpy (no JAX): the local scheduler, the global placement and the simulator
all call it.

Model (per profiled group = (model, qformat, tp, mps_percentage)):

    prefill_time(T, B, C) = a + b * T + c * T * (C + T / (2 B))
        T = prompt tokens in the batch, B = sequences, C = tokens already cached per
        sequence (0 for a fresh prompt). The last term is causal attention work.
    decode_time(B, C)     = d + e * B + f * B * C
        one decode step (one token for each of B sequences), C = mean context length.

a and d are the weight-read / launch floor, b and e the per-token GEMM work, c and f the
attention / KV-read work. Coefficients are fitted by non-negative least squares on relative
error (each point weighted by 1/y, since times span 0.01 s .. 7 s), so every coefficient
is >= 0 and predictions are >= 0 and non-decreasing in T, B and C. The profile CSVs give,
per row, `prefill_time` of a batch of `batch_size` prompts of `input_len` tokens and
`tpot` = decode_time / (output_len - 1) at a context growing from input_len to
input_len + output_len, so a decode point sits at C = input_len + output_len / 2.

Inside the profiled range the fitted surface interpolates (smoothly; the data are noisy).
Outside it (batch, tokens per sequence or decode context beyond the profiled min/max) the
same linear form extrapolates; such queries are counted in `extrapolated_queries` (and per
group in `extrapolation_counts`), with one log warning per group and kind. Predictions are
clamped to at least `MIN_TIME_S`.

Several CSV files: each file is a *source* (a machine). Groups are fitted per source; the
first path wins for a group present in several; a group present only in a later source is
*calibrated* to the first one by the median ratio first/later of their predictions on the
groups both profile (separately for prefill and decode; e.g. aws-cost decode is ~1.8x slower
than apex-cost). `calibrate=False` keeps later sources' numbers as they are.

MPS share (`mps`, default 100; rows of other shares are kept with `from_csv(mps=None)`): a
share between two profiled ones interpolates their coefficients linearly; outside the
profiled shares the nearest one is used.

Unprofiled (model, preset, tp): derived from the nearest profiled group, chosen
lexicographically by (same model or identical geometry, else closest |log parameter
count|), then fewest differing (weights, activations, KV) formats, then nearest |log2 tp|,
then nearest mps. Each
coefficient is scaled by the physical quantity it stands for, target / source:
    a, d  weight bytes / tp      (linear params x {bf16 2, fp8 1, int8 1, int4 0.5} bytes
                                   + lm head in bf16)
    b, e  GEMM FLOPs per token / (tp x activation speed)   (2 x linear params; fp8/int8
                                   activations count as 2x faster than bf16)
    c     attention FLOPs per token pair / tp    (4 x layers x heads x head_dim)
    f     KV bytes per token / tp  (formats.KVFormat.bytes_per_token of the preset's KV dtype)
TP scaling is ideal (optimistic: the profiles show small models gaining little from TP).
A cost model with no group to scale from (`synthetic()`, or profiles whose presets or
geometries are unknown) uses the roofline of `synthetic()` (`Hardware`), see there. A model
with neither a profile nor a known geometry raises UnknownModelError.
`register_alias(name, profiled)` maps a name onto a profiled model's data as-is (no scaling).

Online correction: `observe(kind, model, ...)` keeps, per (model, preset, kind), a
multiplicative factor = EMA of measured / predicted (the first observation sets it; then
factor <- (1 - alpha) factor + alpha ratio), applied to later predictions.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from fineserve_jax.formats import KV_BITS, PRESETS, KVFormat, get_preset

log = logging.getLogger(__name__)

# The FineServe profile CSV columns (shared/data/profiles/*.csv, experiments/profile.py).
PROFILE_COLUMNS = ("model", "qformat", "tp", "mps_percentage", "batch_size", "input_len",
                   "output_len", "seq_len", "prefill_time", "decode_time", "ttft", "tpot", "e2e")

MIN_TIME_S = 1e-6
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
ACT_SPEED = {"bf16": 1.0, "fp8": 2.0, "int8": 2.0}
DEFAULT_PROFILE_FILES = ("apex-cost.csv", "aws-cost.csv")
ENV_VAR = "FINESERVE_DATA_DIR"
KINDS = ("prefill", "decode")

# Spelling fixes for model names found in profile files.
_NAME_FIXES = {"lama-3-8b": "llama-3-8b", "qwen3-32b": "qwen-3-32b", "llama3.1-8b": "llama-3.1-8b",
               "llama3.1-70b": "llama-3.1-70b", "llama3-8b": "llama-3-8b"}


def _pname(preset) -> str:
    """A preset name from a name or a formats.Preset."""
    return preset if isinstance(preset, str) else getattr(preset, "name", str(preset))


def canonical_model_name(name: str) -> str:
    n = str(name).strip().lower().replace("_", "-")
    return _NAME_FIXES.get(n, n)


class UnknownModelError(KeyError):
    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ProfileFormatError(ValueError):
    pass


# --------------------------------------------------------------------------------------
# Geometry


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The sizes the cost model scales with (from a ModelConfig-like object)."""

    linear_params: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg: Any) -> "Geometry":
        if isinstance(cfg, Geometry):
            return cfg
        g = (lambda k: cfg[k]) if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k))
        if isinstance(cfg, Mapping):
            lp = cfg.get("linear_params")
        else:
            lp = cfg.linear_param_count() if hasattr(cfg, "linear_param_count") else None
        d, f, L = int(g("hidden_size")), int(g("intermediate_size")), int(g("num_layers"))
        h, kv, hd = int(g("num_heads")), int(g("num_kv_heads")), int(g("head_dim"))
        if lp is None:
            lp = L * (d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f)
        return cls(int(lp), int(g("vocab_size")), d, L, h, kv, hd)

    @property
    def param_count(self) -> int:
        return self.linear_params + 2 * self.vocab_size * self.hidden_size

    def weight_bytes(self, weights: str) -> float:
        # Linear layers in the preset's weight format; the LM head stays bf16.
        return self.linear_params * WEIGHT_BYTES[weights] + 2.0 * self.vocab_size * self.hidden_size

    def kv_bytes_per_token(self, kv: str) -> float:
        try:
            return float(KVFormat(self.num_layers, self.num_kv_heads, self.head_dim, kv).bytes_per_token)
        except ValueError:
            return self.num_layers * 2 * self.num_kv_heads * self.head_dim * KV_BITS[kv] / 8.0

    def gemm_flops_per_token(self) -> float:
        return 2.0 * self.linear_params

    def attn_flops_per_pair(self) -> float:
        return 4.0 * self.num_layers * self.num_heads * self.head_dim


# Profiled models that models/presets.py does not define (public HF config values).
_EXTRA_GEOMETRY = {
    "qwen-3-32b": dict(hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64,
                       num_kv_heads=8, head_dim=128, vocab_size=151936),
}


def _preset_geometry(name: str) -> Optional[Geometry]:
    if name in _EXTRA_GEOMETRY:
        return Geometry.from_config(_EXTRA_GEOMETRY[name])
    try:
        from models.presets import ALL  # lazy: keep this module importable on its own
    except Exception:  # pragma: no cover - models package unavailable
        return None
    for key, cfg in ALL.items():
        if canonical_model_name(key) == name:
            return Geometry.from_config(cfg)
    return None


# --------------------------------------------------------------------------------------
# Hardware for the roofline


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Roofline parameters for `CostModel.synthetic` (per GPU)."""

    name: str = "H100-SXM"
    hbm_bytes_per_s: float = 3.35e12
    bf16_flops: float = 989e12  # dense
    bandwidth_efficiency: float = 0.7
    flops_efficiency: float = 0.5
    prefill_overhead_s: float = 2e-3
    decode_overhead_s: float = 1e-3

    @property
    def eff_bw(self) -> float:
        return self.hbm_bytes_per_s * self.bandwidth_efficiency

    @property
    def eff_flops(self) -> float:
        return self.bf16_flops * self.flops_efficiency


H100 = Hardware()
H200 = Hardware(name="H200", hbm_bytes_per_s=4.8e12)


def _preset_formats(name: str) -> Optional[Tuple[str, str, str]]:
    p = PRESETS.get(name)
    return (p.weights, p.activations, p.kv) if p is not None else None


def roofline_coefs(geom: Geometry, preset: str, tp: int, hw: Hardware) -> Tuple[np.ndarray, np.ndarray]:
    """(prefill [a, b, c], decode [d, e, f]) of the roofline sum model (see synthetic())."""
    p = get_preset(preset)
    speed = ACT_SPEED.get(p.activations, 1.0)
    w = geom.weight_bytes(p.weights) / tp / hw.eff_bw
    gemm = geom.gemm_flops_per_token() / tp / (hw.eff_flops * speed)
    attn = geom.attn_flops_per_pair() / tp / hw.eff_flops
    kv = geom.kv_bytes_per_token(p.kv) / tp / hw.eff_bw
    return (np.array([hw.prefill_overhead_s + w, gemm, attn]),
            np.array([hw.decode_overhead_s + w, gemm, kv]))


# --------------------------------------------------------------------------------------
# Profile points and fitting


@dataclasses.dataclass(frozen=True)
class ProfilePoint:
    """One profiled configuration (seconds). tpot is one decode step at batch_size."""

    model: str
    qformat: str
    tp: int
    batch_size: int
    input_len: int
    output_len: int
    prefill_time: float
    tpot: float
    mps: int = 100
    source: str = "points"

    @property
    def key(self) -> Tuple[str, str, int, int]:
        return (canonical_model_name(self.model), self.qformat, int(self.tp), int(self.mps))

    @property
    def decode_context(self) -> float:
        return self.input_len + self.output_len / 2.0


def prefill_features(num_tokens, batch_size, context) -> np.ndarray:
    T = np.asarray(num_tokens, dtype=np.float64)
    B = np.maximum(np.asarray(batch_size, dtype=np.float64), 1.0)
    C = np.asarray(context, dtype=np.float64)
    return np.stack(np.broadcast_arrays(np.ones_like(T), T, T * (C + T / (2.0 * B))), axis=-1)


def decode_features(batch_size, context) -> np.ndarray:
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
    groups: Dict[Tuple, List[ProfilePoint]] = {}
    for p in points:
        groups.setdefault(p.key, []).append(p)
    return {k: fit_group(v, loo=loo) for k, v in sorted(groups.items())}


_CSV_REQUIRED = ("model", "qformat", "batch_size", "input_len")


def read_profile_csv(path: Union[str, os.PathLike], mps: Optional[int] = 100) -> List[ProfilePoint]:
    """Rows of a profile CSV (FineServe columns) as ProfilePoints.

    Needs model, qformat, batch_size, input_len, prefill_time (or ttft) and tpot (or
    decode_time with output_len); tp and mps_percentage default to 1 and 100. `mps`
    keeps only rows at that MPS percentage (None keeps all). Errors name file and line.
    """
    path = os.fspath(path)
    source = Path(path).stem
    out: List[ProfilePoint] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = fields
        missing = [c for c in _CSV_REQUIRED if c not in fields]
        if "prefill_time" not in fields and "ttft" not in fields:
            missing.append("prefill_time|ttft")
        if "tpot" not in fields and not {"decode_time", "output_len"} <= set(fields):
            missing.append("tpot|decode_time+output_len")
        if missing:
            raise ProfileFormatError(f"{path}:1: missing column(s) {', '.join(missing)} in header {fields}")
        for row in reader:
            line = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise ProfileFormatError(f"{path}:{line}: wrong number of fields")

            def num(name, default=None, kind=float):
                v = row.get(name)
                if v is None or v.strip() == "":
                    if default is None:
                        raise ProfileFormatError(f"{path}:{line}: empty {name}")
                    return default
                try:
                    x = kind(float(v)) if kind is int else float(v)
                except ValueError:
                    raise ProfileFormatError(f"{path}:{line}: {name} is not a number: {v!r}") from None
                if not math.isfinite(x) or x < 0:
                    raise ProfileFormatError(f"{path}:{line}: {name} must be finite and >= 0, got {v!r}")
                return x

            m = num("mps_percentage", 100, int)
            if mps is not None and m != mps:
                continue
            out_len = num("output_len", 2, int)
            pf = num("prefill_time") if "prefill_time" in fields else num("ttft")
            if "tpot" in fields:
                tpot = num("tpot")
            else:
                tpot = num("decode_time") / max(out_len - 1, 1)
            if pf <= 0 or tpot <= 0:
                raise ProfileFormatError(f"{path}:{line}: times must be > 0")
            out.append(ProfilePoint(
                model=canonical_model_name(row["model"]), qformat=row["qformat"].strip(),
                tp=num("tp", 1, int), batch_size=num("batch_size", kind=int),
                input_len=num("input_len", kind=int), output_len=out_len,
                prefill_time=pf, tpot=tpot, mps=m, source=source,
            ))
    return out


def default_profile_dir() -> Path:
    """`$FINESERVE_DATA_DIR/profiles` (or the variable itself) when the variable is set, else
    `<repo>/../shared/data/profiles` (or `<repo>/shared/data/profiles`)."""
    env = os.environ.get(ENV_VAR)
    if env:  # an explicit setting is not second-guessed
        cands = [Path(env).expanduser() / "profiles", Path(env).expanduser()]
    else:
        root = Path(__file__).resolve().parents[2]
        cands = [root.parent / "shared" / "data" / "profiles", root / "shared" / "data" / "profiles"]
    for c in cands:
        if all((c / f).is_file() for f in DEFAULT_PROFILE_FILES):
            return c
    raise FileNotFoundError(
        f"profile CSVs {DEFAULT_PROFILE_FILES} not found in any of {[str(c) for c in cands]} "
        f"(set ${ENV_VAR})"
    )


# --------------------------------------------------------------------------------------
# The cost model


@dataclasses.dataclass(frozen=True)
class _Resolved:
    prefill_coef: np.ndarray
    decode_coef: np.ndarray
    fit: Optional[GroupFit]  # the group whose range applies (None: synthetic)
    how: str

    def __post_init__(self):  # plain floats for the hot path
        object.__setattr__(self, "prefill_t", tuple(float(x) for x in self.prefill_coef))
        object.__setattr__(self, "decode_t", tuple(float(x) for x in self.decode_coef))


class CostModel:
    """Prefill / decode step-time predictor. See the module docstring for the model."""

    def __init__(
        self,
        fits: Optional[Mapping[Tuple, GroupFit]] = None,
        *,
        hardware: Hardware = H100,
        ema_alpha: float = 0.3,
        calibration: Optional[Dict[str, Any]] = None,
    ):
        self.fits: Dict[Tuple, GroupFit] = dict(fits or {})
        self.hardware = hardware
        if not 0 < ema_alpha <= 1:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        self.ema_alpha = ema_alpha
        self.calibration = dict(calibration or {})
        self._aliases: Dict[str, str] = {}
        self._geometry: Dict[str, Geometry] = {}
        self._corr: Dict[Tuple[str, str, str], float] = {}
        self._corr_n: Dict[Tuple[str, str, str], int] = {}
        self._last_preset: Dict[str, str] = {}
        self._cache: Dict[Tuple, _Resolved] = {}
        self._warned: set = set()
        self.extrapolated_queries = 0
        self.extrapolation_counts: Dict[Tuple, int] = {}
        self.queries = 0

    # ---- construction ----
    @classmethod
    def from_points(cls, points: Iterable[ProfilePoint], **kw) -> "CostModel":
        return cls(fit_points(points), **kw)

    fit = staticmethod(fit_points)

    @classmethod
    def from_csv(
        cls,
        paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        *,
        mps: Optional[int] = 100,
        calibrate: bool = True,
        **kw,
    ) -> "CostModel":
        """Fit every CSV (one source each), merge in order (first wins), calibrate later ones."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        per_source: List[Dict[Tuple, GroupFit]] = []
        names: List[str] = []
        for p in paths:
            pts = read_profile_csv(p, mps=mps)
            if not pts:
                raise ProfileFormatError(f"{os.fspath(p)}: no rows (at mps={mps})")
            per_source.append(fit_points(pts))
            names.append(Path(p).stem)
        merged = dict(per_source[0]) if per_source else {}
        calib: Dict[str, Any] = {}
        for name, fits in zip(names[1:], per_source[1:]):
            rp, rd, n = _calibration_ratios(merged, fits) if calibrate else (1.0, 1.0, 0)
            calib[name] = {"prefill_ratio": rp, "decode_ratio": rd, "common_groups": n,
                           "reference": names[0]}
            for k, g in fits.items():
                if k in merged:
                    continue
                if calibrate and n:
                    g = dataclasses.replace(
                        g, prefill_coef=g.prefill_coef * rp, decode_coef=g.decode_coef * rd,
                        source=f"{g.source} (calibrated to {names[0]}: prefill x{rp:.3f}, decode x{rd:.3f})",
                    )
                merged[k] = g
        return cls(merged, calibration=calib, **kw)

    @classmethod
    def from_profiles(cls, paths=None, **kw) -> "CostModel":
        """The shared FineServe profiles (apex-cost.csv first, then aws-cost.csv) by default."""
        if paths is None:
            d = default_profile_dir()
            paths = [d / f for f in DEFAULT_PROFILE_FILES]
        return cls.from_csv(paths, **kw)

    @classmethod
    def synthetic(cls, hardware: Hardware = H100, **kw) -> "CostModel":
        """A profile-free roofline model for any model whose geometry is known:

            prefill = overhead + weight_bytes/(tp*BW) + 2*linear_params*T/(tp*FLOPS*speed)
                      + 4*layers*heads*head_dim*T*(C + T/2B)/(tp*FLOPS)
            decode  = overhead + weight_bytes/(tp*BW) + 2*linear_params*B/(tp*FLOPS*speed)
                      + kv_bytes_per_token*B*C/(tp*BW)
        with BW, FLOPS the hardware's effective (efficiency-scaled) HBM bandwidth and bf16
        FLOP rate, speed 2 for fp8/int8 activations. Sums, not max: a pessimistic roofline.
        """
        return cls({}, hardware=hardware, **kw)

    # ---- names ----
    def register_alias(self, name: str, profiled_name: str) -> None:
        """Predict `name` with `profiled_name`'s data, unscaled (e.g. tiny test models)."""
        a, t = canonical_model_name(name), canonical_model_name(profiled_name)
        if a == t:
            raise ValueError(f"alias {name!r} -> {profiled_name!r} points to itself")
        seen = {a}
        x = t
        while x in self._aliases:
            x = self._aliases[x]
            if x in seen:
                raise ValueError(f"alias {name!r} -> {profiled_name!r} makes a cycle")
            seen.add(x)
        self._aliases[a] = t
        self._cache.clear()

    def register_geometry(self, name: str, config: Any) -> None:
        """Give the sizes of a model (a ModelConfig, a Geometry or a dict) for scaling."""
        self._geometry[canonical_model_name(name)] = Geometry.from_config(config)
        self._cache.clear()

    def _resolve_name(self, model: str) -> str:
        m = canonical_model_name(model)
        seen = set()
        while m in self._aliases and m not in seen:
            seen.add(m)
            m = self._aliases[m]
        return m

    def geometry(self, model: str) -> Optional[Geometry]:
        m = self._resolve_name(model)
        return self._geometry.get(m) or _preset_geometry(m)

    def known_models(self) -> List[str]:
        """Profiled model names and registered aliases (canonical spellings)."""
        return sorted({k[0] for k in self.fits} | set(self._aliases))

    def profiled(self) -> List[Tuple[str, str, int, int]]:
        """(model, qformat, tp, mps) of every fitted group."""
        return sorted(self.fits)

    def fit_report(self) -> List[Dict[str, Any]]:
        return [self.fits[k].report() for k in sorted(self.fits)]

    # ---- resolution ----
    def _resolve(self, model: str, preset, tp: int, mps: int) -> _Resolved:
        r = self._cache.get((model, preset, tp, mps))
        if r is None:
            key = (canonical_model_name(model), _pname(preset), int(tp), int(mps))
            r = self._cache.get(key)
            if r is None:
                r = self._resolve_uncached(*key)
                self._cache[key] = r
            self._cache[(model, preset, tp, mps)] = r
        return r

    def _resolve_uncached(self, model, preset, tp, mps) -> _Resolved:
        name = self._resolve_name(model)
        via = f" (alias of {name})" if name != model else ""
        exact = self.fits.get((name, preset, tp, mps))
        if exact is not None:
            return _Resolved(exact.prefill_coef, exact.decode_coef, exact, f"profiled{via}: {exact.source}")
        geom = self.geometry(name)
        if preset not in PRESETS and not any(k[1] == preset for k in self.fits):
            raise ValueError(f"unknown precision preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        # Same group at other MPS shares: interpolate linearly in mps between the two
        # profiled shares around it; outside their range use the nearest one.
        same = sorted((g for k, g in self.fits.items() if k[:3] == (name, preset, tp)), key=lambda g: g.mps)
        if same:
            lo = [g for g in same if g.mps < mps]
            hi = [g for g in same if g.mps > mps]
            if lo and hi:
                g0, g1 = lo[-1], hi[0]
                w = (mps - g0.mps) / (g1.mps - g0.mps)
                near = g0 if w <= 0.5 else g1
                return _Resolved(
                    (1 - w) * g0.prefill_coef + w * g1.prefill_coef,
                    (1 - w) * g0.decode_coef + w * g1.decode_coef, near,
                    f"interpolated between mps={g0.mps} and mps={g1.mps}{via}: {g0.source}",
                )
            g = (lo or hi)[-1 if lo else 0]
            return _Resolved(g.prefill_coef, g.decode_coef, g, f"profiled at mps={g.mps} (nearest){via}: {g.source}")
        if geom is None:
            raise UnknownModelError(
                f"no profile and no geometry for model {model!r}; profiled: "
                f"{', '.join(sorted({k[0] for k in self.fits})) or 'none'}; give its sizes with "
                f"register_geometry() or map it with register_alias(name, profiled_name)"
            )
        if preset not in PRESETS:
            raise ValueError(f"cannot derive unknown preset {preset!r} for {model!r}")
        src = self._nearest(name, geom, preset, tp, mps)
        if src is None:
            pc, dc = roofline_coefs(geom, preset, tp, self.hardware)
            return _Resolved(pc, dc, None, f"synthetic roofline ({self.hardware.name}){via}")
        sgeom = self.geometry(src.model)
        pc, dc, ratios = _scale_coefs(src, sgeom, geom, preset, tp)
        how = (f"derived{via} from {src.model}/{src.qformat}/tp{src.tp}/mps{src.mps} "
               f"[{src.source}] scaled " + ", ".join(f"{k} x{v:.3g}" for k, v in ratios.items()))
        return _Resolved(pc, dc, src, how)

    def _nearest(self, name, geom, preset, tp, mps) -> Optional[GroupFit]:
        tgt_fmt = _preset_formats(preset)
        best, best_key = None, None
        for g in self.fits.values():
            src_fmt = _preset_formats(g.qformat)
            sgeom = self.geometry(g.model)
            if src_fmt is None or sgeom is None:
                continue  # cannot scale from an unknown preset or geometry
            same = g.model == name or sgeom == geom  # e.g. llama-3-8b and llama-3.1-8b
            md = 0.0 if same else 1.0 + abs(math.log(sgeom.param_count / geom.param_count))
            pd = sum(a != b for a, b in zip(src_fmt, tgt_fmt))
            td = abs(math.log2(g.tp / tp))
            key = (md, pd, td, abs(g.mps - mps), g.model, g.qformat)
            if best_key is None or key < best_key:
                best, best_key = g, key
        return best

    def explain(self, model: str, preset: str, tp: int = 1, mps: int = 100) -> Dict[str, Any]:
        """How a (model, preset, tp) is predicted: profiled, derived (from what), synthetic."""
        r = self._resolve(model, preset, tp, mps)
        return {"how": r.how, "prefill_coef": [float(x) for x in r.prefill_coef],
                "decode_coef": [float(x) for x in r.decode_coef],
                "correction": {k: self.correction(model, k, preset) for k in KINDS}}

    # ---- prediction ----
    def _check_extrapolation(self, r: _Resolved, kind, model, preset, tp, batch, tokens_per_seq, context):
        self.queries += 1
        g = r.fit
        if g is None:
            return
        eps = 1e-9
        out = not (g.batch_range[0] - eps <= batch <= g.batch_range[1] + eps)
        if kind == "prefill":
            out = out or not (g.tokens_range[0] - eps <= tokens_per_seq <= g.tokens_range[1] + eps)
        else:
            out = out or not (g.context_range[0] - eps <= context <= g.context_range[1] + eps)
        if out:
            self.extrapolated_queries += 1
            k = (canonical_model_name(model), preset, int(tp), kind)
            self.extrapolation_counts[k] = self.extrapolation_counts.get(k, 0) + 1
            if k not in self._warned:
                self._warned.add(k)
                log.warning(
                    "cost model: %s %s/%s/tp%d outside the profiled range (batch %s, tokens/seq %s, "
                    "context %s; profiled batch %s, tokens %s, decode context %s): linear extrapolation",
                    kind, model, preset, tp, batch, tokens_per_seq, context,
                    g.batch_range, g.tokens_range, g.context_range,
                )

    def raw_prefill_time(self, model, preset, num_tokens, batch_size=1, context=0, tp=1, *, mps=100) -> float:
        """prefill_time without the online correction."""
        preset = _pname(preset)
        if num_tokens < 0 or batch_size < 1 or context < 0:
            raise ValueError(f"bad prefill query: num_tokens={num_tokens}, batch_size={batch_size}, context={context}")
        if num_tokens == 0:
            return 0.0
        r = self._resolve(model, preset, tp, mps)
        L = num_tokens / batch_size
        self._check_extrapolation(r, "prefill", model, preset, tp, batch_size, L, context)
        a, b, c = r.prefill_t
        return max(a + num_tokens * (b + c * (context + 0.5 * L)), MIN_TIME_S)

    def raw_decode_time(self, model, preset, batch_size, context, tp=1, *, mps=100) -> float:
        """decode_time without the online correction."""
        preset = _pname(preset)
        if batch_size < 0 or context < 0:
            raise ValueError(f"bad decode query: batch_size={batch_size}, context={context}")
        if batch_size == 0:
            return 0.0
        r = self._resolve(model, preset, tp, mps)
        self._check_extrapolation(r, "decode", model, preset, tp, batch_size, None, context)
        d, e, f = r.decode_t
        return max(d + batch_size * (e + f * context), MIN_TIME_S)

    def prefill_time(self, model: str, preset: str, num_tokens: int, batch_size: int = 1,
                     context: float = 0, tp: int = 1, *, mps: int = 100) -> float:
        """Seconds for one prefill step of `num_tokens` prompt tokens over `batch_size`
        sequences that already have `context` cached tokens each."""
        preset = _pname(preset)
        self._last_preset[canonical_model_name(model)] = preset
        raw = self.raw_prefill_time(model, preset, num_tokens, batch_size, context, tp, mps=mps)
        return raw * self.correction(model, "prefill", preset)

    def decode_time(self, model: str, preset: str, batch_size: int, context: float,
                    tp: int = 1, *, mps: int = 100) -> float:
        """Seconds for one decode step of `batch_size` sequences of mean context `context`."""
        preset = _pname(preset)
        self._last_preset[canonical_model_name(model)] = preset
        raw = self.raw_decode_time(model, preset, batch_size, context, tp, mps=mps)
        return raw * self.correction(model, "decode", preset)

    def ttft(self, model: str, preset: str, prompt_len: int, tp: int = 1, *,
             queue_s: float = 0.0, mps: int = 100) -> float:
        """TTFT of a lone request: queueing + one prefill of `prompt_len` tokens."""
        return queue_s + self.prefill_time(model, preset, prompt_len, 1, 0, tp, mps=mps)

    def default_slo_ttft(self, model: str, preset: str, tp: int = 1, *, scale: float = 40.0,
                         prompt_len: int = 903, offset_s: float = 0.004) -> float:
        """FineServe's default TTFT SLO: 40 x the single-request TTFT of a 903-token prompt
        (LMSYS-Chat P95 prompt length) + 4 ms. Uses uncorrected predictions."""
        return scale * self.raw_prefill_time(model, preset, prompt_len, 1, 0, tp) + offset_s

    # ---- online correction ----
    def _corr_key(self, model, kind, preset):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        m = canonical_model_name(model)
        if preset is None:
            preset = self._last_preset.get(m, "org")
        return (m, _pname(preset), kind)

    def correction(self, model: str, kind: str, preset: Optional[str] = None) -> float:
        return self._corr.get(self._corr_key(model, kind, preset), 1.0)

    def observe(self, kind: str, model: str, batch: int, tokens: int, context: float,
                measured_s: float, *, preset: Optional[str] = None, tp: int = 1, mps: int = 100) -> float:
        """Record a measured step time; returns the updated correction factor.

        kind "prefill": `tokens` prompt tokens over `batch` sequences with `context` cached;
        kind "decode": `batch` sequences at mean context `context` (`tokens` ignored).
        `preset` defaults to the last preset this model was predicted with ("org" if none).
        """
        key = self._corr_key(model, kind, preset)
        if not (measured_s > 0 and math.isfinite(measured_s)):
            raise ValueError(f"measured_s must be positive and finite, got {measured_s!r}")
        if kind == "prefill":
            raw = self.raw_prefill_time(model, key[1], tokens, batch, context, tp, mps=mps)
        else:
            raw = self.raw_decode_time(model, key[1], batch, context, tp, mps=mps)
        if raw <= 0:
            return self._corr.get(key, 1.0)
        ratio = measured_s / raw
        n = self._corr_n.get(key, 0)
        f = ratio if n == 0 else (1 - self.ema_alpha) * self._corr[key] + self.ema_alpha * ratio
        self._corr[key] = f
        self._corr_n[key] = n + 1
        return f

    def reset_corrections(self) -> None:
        self._corr.clear()
        self._corr_n.clear()


def _scale_coefs(src: GroupFit, sgeom: Geometry, tgeom: Geometry, preset: str, tp: int):
    sp, tp_ = get_preset(src.qformat), get_preset(preset)
    tpr = src.tp / tp
    r_w = tgeom.weight_bytes(tp_.weights) / sgeom.weight_bytes(sp.weights) * tpr
    r_gemm = (tgeom.gemm_flops_per_token() / ACT_SPEED.get(tp_.activations, 1.0)) / (
        sgeom.gemm_flops_per_token() / ACT_SPEED.get(sp.activations, 1.0)) * tpr
    r_attn = tgeom.attn_flops_per_pair() / sgeom.attn_flops_per_pair() * tpr
    r_kv = tgeom.kv_bytes_per_token(tp_.kv) / sgeom.kv_bytes_per_token(sp.kv) * tpr
    pc = src.prefill_coef * np.array([r_w, r_gemm, r_attn])
    dc = src.decode_coef * np.array([r_w, r_gemm, r_kv])
    return pc, dc, {"weights": r_w, "gemm": r_gemm, "attn": r_attn, "kv": r_kv}


def _calibration_ratios(ref: Mapping[Tuple, GroupFit], other: Mapping[Tuple, GroupFit]):
    """Median over common groups of ref/other predictions at the other group's range corners."""
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


def format_fit_report(cm: CostModel) -> str:
    """A fixed-width table of every group's coefficients and fit errors (relative)."""
    head = (f"{'model':<14} {'qformat':<8} {'tp':>2} {'mps':>4} {'n':>3} | {'pf MAPE':>7} {'pf max':>7} "
            f"{'pf LOO':>7} | {'dec MAPE':>8} {'dec max':>7} {'dec LOO':>7} | source")
    lines = [head, "-" * len(head)]
    for r in cm.fit_report():
        lines.append(
            f"{r['model']:<14} {r['qformat']:<8} {r['tp']:>2} {r['mps']:>4} {r['n_points']:>3} | "
            f"{r['prefill_mape']:>7.3f} {r['prefill_max_rel']:>7.3f} {r['prefill_loo_mape']:>7.3f} | "
            f"{r['decode_mape']:>8.3f} {r['decode_max_rel']:>7.3f} {r['decode_loo_mape']:>7.3f} | "
            f"{r['source'].split(' (')[0]}{' (calibrated)' if 'calibrated' in r['source'] else ''}"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m fineserve_jax.scheduler.cost_model [CSV ...]
    import sys

    _cm = CostModel.from_csv(sys.argv[1:]) if len(sys.argv) > 1 else CostModel.from_profiles()
    print(format_fit_report(_cm))
    for _name, _c in _cm.calibration.items():
        print(f"calibration {_name} -> {_c['reference']}: prefill x{_c['prefill_ratio']:.3f}, "
              f"decode x{_c['decode_ratio']:.3f} over {_c['common_groups']} common groups")

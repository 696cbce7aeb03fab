"""`CostModel`: prefill and decode step time per (model, precision preset, TP size, MPS share).

A query resolves (model, preset, tp, mps) once (cached) to prefill and decode coefficients
(fit.py's model), in this order:
  1. a profiled group: its fitted coefficients;
  2. the same (model, preset, tp) at other MPS shares: between two profiled shares the
     coefficients interpolate linearly; outside them the nearest share is used;
  3. derived from the nearest profiled group, chosen lexicographically by (same model or
     identical geometry, else closest |log parameter count|), then fewest differing (weights,
     activations, KV) formats, then nearest |log2 tp|, then nearest mps; each coefficient is
     scaled by target / source of the quantity it stands for (geometry.py). TP scaling is
     ideal (optimistic: the profiles show small models gaining little from TP);
  4. with no group to scale from (`synthetic()`, or profiles whose presets or geometries are
     unknown): the roofline of `self.hardware` (geometry.roofline_coefs);
  5. a model with neither a profile nor a known geometry raises UnknownModelError.
`register_alias(name, profiled)` maps a name onto a profiled model's data as-is (no scaling).

Several CSV files: each is a *source* (a machine), fitted separately; the first path wins for
a group present in several; a group present only in a later source is *calibrated* to the
first by fit.calibration_ratios (separately for prefill and decode; e.g. aws-cost decode is
~1.8x slower than apex-cost). `calibrate=False` keeps later sources' numbers as they are.

Inside the profiled range the fitted surface interpolates (smoothly; the data are noisy).
Outside it (batch, tokens per sequence or decode context beyond the profiled min/max) the
same linear form extrapolates; such queries are counted in `extrapolated_queries` (and per
group in `extrapolation_counts`), with one log warning per group and kind. Predictions are
clamped to at least `MIN_TIME_S`.

The model never corrects itself online: the engine's step times are corrected in
`scheduler.step_cost.BucketProfile`, and to the simulator the cost model is the device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from fineserve_jax.formats import PRESETS, get_preset
from fineserve_jax.scheduler.cost.fit import GroupFit, calibration_ratios, fit_points
from fineserve_jax.scheduler.cost.geometry import (
    ACT_SPEED,
    H100,
    Geometry,
    Hardware,
    preset_formats,
    preset_geometry,
    roofline_coefs,
)
from fineserve_jax.scheduler.cost.profiles import (
    DEFAULT_PROFILE_FILES,
    ProfileFormatError,
    ProfilePoint,
    canonical_model_name,
    default_profile_dir,
    read_profile_csv,
)

# Every cost module logs as the package, so one name silences them all.
log = logging.getLogger(__package__)

MIN_TIME_S = 1e-6


def _pname(preset) -> str:
    """A preset name from a name or a formats.Preset."""
    return preset if isinstance(preset, str) else getattr(preset, "name", str(preset))


class UnknownModelError(KeyError):
    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


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
    """Prefill / decode step-time predictor. See the module docstring for the resolution."""

    def __init__(
        self,
        fits: Optional[Mapping[Tuple, GroupFit]] = None,
        *,
        hardware: Hardware = H100,
        calibration: Optional[Dict[str, Any]] = None,
    ):
        self.fits: Dict[Tuple, GroupFit] = dict(fits or {})
        self.hardware = hardware
        self.calibration = dict(calibration or {})
        self._aliases: Dict[str, str] = {}
        self._geometry: Dict[str, Geometry] = {}
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
            rp, rd, n = calibration_ratios(merged, fits) if calibrate else (1.0, 1.0, 0)
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
        """A profile-free model for any model whose geometry is known: the roofline of
        `hardware` (geometry.roofline_coefs)."""
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
        return self._geometry.get(m) or preset_geometry(m)

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
        tgt_fmt = preset_formats(preset)
        best, best_key = None, None
        for g in self.fits.values():
            src_fmt = preset_formats(g.qformat)
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
                "decode_coef": [float(x) for x in r.decode_coef]}

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

    def prefill_time(self, model: str, preset: str, num_tokens: int, batch_size: int = 1,
                     context: float = 0, tp: int = 1, *, mps: int = 100) -> float:
        """Seconds for one prefill step of `num_tokens` prompt tokens over `batch_size`
        sequences that already have `context` cached tokens each."""
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

    def decode_time(self, model: str, preset: str, batch_size: int, context: float,
                    tp: int = 1, *, mps: int = 100) -> float:
        """Seconds for one decode step of `batch_size` sequences of mean context `context`."""
        preset = _pname(preset)
        if batch_size < 0 or context < 0:
            raise ValueError(f"bad decode query: batch_size={batch_size}, context={context}")
        if batch_size == 0:
            return 0.0
        r = self._resolve(model, preset, tp, mps)
        self._check_extrapolation(r, "decode", model, preset, tp, batch_size, None, context)
        d, e, f = r.decode_t
        return max(d + batch_size * (e + f * context), MIN_TIME_S)

    def ttft(self, model: str, preset: str, prompt_len: int, tp: int = 1, *,
             queue_s: float = 0.0, mps: int = 100) -> float:
        """TTFT of a lone request: queueing + one prefill of `prompt_len` tokens."""
        return queue_s + self.prefill_time(model, preset, prompt_len, 1, 0, tp, mps=mps)

    def default_slo_ttft(self, model: str, preset: str, tp: int = 1, *, scale: float = 40.0,
                         prompt_len: int = 903, offset_s: float = 0.004) -> float:
        """FineServe's default TTFT SLO: 40 x the single-request TTFT of a 903-token prompt
        (LMSYS-Chat P95 prompt length) + 4 ms."""
        return scale * self.prefill_time(model, preset, prompt_len, 1, 0, tp) + offset_s


def _scale_coefs(src: GroupFit, sgeom: Geometry, tgeom: Geometry, preset: str, tp: int):
    """`src`'s coefficients moved to (tgeom, preset, tp): each times target / source of the
    quantity it stands for (geometry.py). Returns (prefill, decode, {quantity: ratio})."""
    sp, tp_ = get_preset(src.qformat), get_preset(preset)
    tpr = src.tp / tp
    r_w = tgeom.weight_bytes(tp_.weights) / sgeom.weight_bytes(sp.weights) * tpr
    r_gemm = (tgeom.gemm_flops_per_token() / ACT_SPEED.get(tp_.activations, 1.0)) / (
        sgeom.gemm_flops_per_token() / ACT_SPEED.get(sp.activations, 1.0)) * tpr
    r_attn = tgeom.attn_flops_per_pair() / sgeom.attn_flops_per_pair() * tpr
    r_kv = tgeom.kv_bytes_per_token(tp_.kv, tp) / sgeom.kv_bytes_per_token(sp.kv, src.tp) * tpr
    pc = src.prefill_coef * np.array([r_w, r_gemm, r_attn])
    dc = src.decode_coef * np.array([r_w, r_gemm, r_kv])
    return pc, dc, {"weights": r_w, "gemm": r_gemm, "attn": r_attn, "kv": r_kv}


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


def load_cost_model(paths=None) -> CostModel:
    """The simulator's cost model: `CostModel.from_csv(paths)`, or the shared FineServe
    profiles by default. Extrapolation warnings (one per group) are expected (ShareGPT prompts
    are shorter than the profiled 256..512 tokens; the counts stay in the cost model), so the
    cost model's logger is set to errors only."""
    log.setLevel(logging.ERROR)
    return CostModel.from_csv(list(paths)) if paths else CostModel.from_profiles()

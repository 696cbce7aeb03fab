"""Serving metrics: TTFT, TPOT, ITL, E2E, SLO attainment, goodput, throughput, KV use.

Pure Python + numpy (no JAX): the engine, the simulator and the experiment scripts share it.

Definitions (times in seconds):
  TTFT  = first_token_s - arrival_s
  E2E   = finish_s - arrival_s            (finish_s defaults to the last token time)
  TPOT  = (E2E - TTFT) / (num_output_tokens - 1); undefined for 1-token outputs, which are
          left out of TPOT statistics
  ITL   = gaps between consecutive token times (needs token_times_s), pooled over requests
  Latency statistics are over *finished* requests only. Percentiles use numpy's linear
  interpolation; a statistic of an empty set is None (JSON null), never NaN.
  SLO attainment (FineServe's definition) = met / requests-with-an-SLO, where a request met
  its SLO iff it finished and TTFT < its SLO; a dropped or failed request counts as missed.
  A request's SLO is its own `slo_ttft_s`, else the `slo_ttft_s` given to `summarize`
  (a number or a dict per model); requests with no SLO are left out of attainment; a model
  with none at all has attainment None.
  goodput_rps = met / duration_s; request_throughput_rps = finished / duration_s;
  output_tokens_per_s counts the output tokens of finished requests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

STATUSES = ("finished", "dropped", "failed")
PERCENTILES = (50, 90, 99)
_TOL = 1e-9


class ConservationError(ValueError):
    """requests != finished + dropped + failed somewhere in a summary."""


@dataclasses.dataclass
class RequestRecord:
    """What happened to one request. Times are absolute seconds on one clock."""

    request_id: int
    model: str
    arrival_s: float
    first_token_s: Optional[float] = None
    token_times_s: Optional[List[float]] = None  # every output token's time, first included
    finish_s: Optional[float] = None
    num_output_tokens: int = 0
    status: str = "finished"
    finish_reason: Optional[str] = None  # "eos", "length", "stop", "slo", "oom", ...
    slo_ttft_s: Optional[float] = None
    preemptions: int = 0
    prompt_len: int = 0
    preset: Optional[str] = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"request {self.request_id}: status must be one of {STATUSES}, got {self.status!r}")
        if self.token_times_s is not None:
            self.token_times_s = [float(t) for t in self.token_times_s]
            tt = self.token_times_s
            if any(b < a - _TOL for a, b in zip(tt, tt[1:])):
                raise ValueError(f"request {self.request_id}: token_times_s must be non-decreasing")
            if tt:
                if self.first_token_s is None:
                    self.first_token_s = tt[0]
                if self.finish_s is None and self.status == "finished":
                    self.finish_s = tt[-1]
                if self.num_output_tokens == 0:
                    self.num_output_tokens = len(tt)
                # Catch stale fields (e.g. dataclasses.replace of token_times_s alone).
                if abs(self.first_token_s - tt[0]) > _TOL or self.num_output_tokens != len(tt):
                    raise ValueError(
                        f"request {self.request_id}: first_token_s/num_output_tokens disagree "
                        f"with token_times_s ({self.first_token_s} vs {tt[0]}, "
                        f"{self.num_output_tokens} vs {len(tt)})"
                    )
                if self.finish_s is not None and self.finish_s < tt[-1] - _TOL:
                    raise ValueError(f"request {self.request_id}: finish_s before the last token")
        if self.first_token_s is not None and self.first_token_s < self.arrival_s - _TOL:
            raise ValueError(f"request {self.request_id}: first token before arrival")
        if self.finish_s is not None:
            start = self.first_token_s if self.first_token_s is not None else self.arrival_s
            if self.finish_s < start - _TOL:
                raise ValueError(f"request {self.request_id}: finish before first token/arrival")
        if self.status == "finished":
            if self.first_token_s is None or self.finish_s is None or self.num_output_tokens < 1:
                raise ValueError(
                    f"request {self.request_id}: a finished request needs first_token_s, "
                    "finish_s (or token_times_s) and num_output_tokens >= 1"
                )
        if self.preemptions < 0 or self.num_output_tokens < 0:
            raise ValueError(f"request {self.request_id}: negative counts")

    # -- per-request latencies (None when undefined) --
    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> Optional[float]:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> Optional[float]:
        if self.status != "finished" or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)

    @property
    def itl_s(self) -> List[float]:
        tt = self.token_times_s or []
        return [b - a for a, b in zip(tt, tt[1:])]

    def met_slo(self, slo_ttft_s: Optional[float] = None) -> Optional[bool]:
        """True/False against its own SLO (else the one given); None if there is none."""
        slo = self.slo_ttft_s if self.slo_ttft_s is not None else slo_ttft_s
        if slo is None:
            return None
        return self.status == "finished" and self.ttft_s is not None and self.ttft_s < slo


class RequestTracker:
    """Builds RequestRecords from engine/simulator events; each request ends exactly once."""

    def __init__(self):
        self._open: Dict[int, RequestRecord] = {}
        self._done: Dict[int, RequestRecord] = {}

    def arrive(self, request_id: int, model: str, arrival_s: float, *, slo_ttft_s=None,
               prompt_len: int = 0, preset: Optional[str] = None) -> None:
        if request_id in self._open or request_id in self._done:
            raise ValueError(f"request {request_id} arrived twice")
        self._open[request_id] = RequestRecord(
            request_id, model, float(arrival_s), token_times_s=[], status="dropped",
            slo_ttft_s=slo_ttft_s, prompt_len=prompt_len, preset=preset)

    def token(self, request_id: int, t: float, n: int = 1) -> None:
        """`n` output tokens produced at time t."""
        rec = self._get(request_id)
        if rec.token_times_s and t < rec.token_times_s[-1] - _TOL:
            raise ValueError(f"request {request_id}: token time went backwards")
        if rec.first_token_s is None:
            rec.first_token_s = float(t)
        rec.token_times_s.extend([float(t)] * n)
        rec.num_output_tokens += n

    def preempt(self, request_id: int) -> None:
        self._get(request_id).preemptions += 1

    def finish(self, request_id: int, t: float, status: str = "finished",
               reason: Optional[str] = None) -> RequestRecord:
        if request_id in self._done:
            raise ValueError(f"request {request_id} ended twice")
        rec = self._get(request_id)
        del self._open[request_id]
        done = RequestRecord(
            rec.request_id, rec.model, rec.arrival_s, rec.first_token_s, rec.token_times_s,
            float(t), rec.num_output_tokens, status, reason, rec.slo_ttft_s, rec.preemptions,
            rec.prompt_len, rec.preset)
        self._done[request_id] = done
        return done

    def _get(self, request_id) -> RequestRecord:
        try:
            return self._open[request_id]
        except KeyError:
            state = "already ended" if request_id in self._done else "unknown"
            raise ValueError(f"request {request_id} is {state}") from None

    @property
    def open_requests(self) -> List[int]:
        return sorted(self._open)

    def records(self, *, require_closed: bool = True) -> List[RequestRecord]:
        if require_closed and self._open:
            raise ConservationError(f"{len(self._open)} request(s) never ended: {self.open_requests[:10]}")
        return [self._done[k] for k in sorted(self._done)]


# --------------------------------------------------------------------------------------
# Summaries


def _f(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def latency_stats(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """{"p50", "p90", "p99", "mean"}; all None for an empty set."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {**{f"p{q}": None for q in PERCENTILES}, "mean": None}
    out = {f"p{q}": _f(np.percentile(v, q)) for q in PERCENTILES}
    out["mean"] = _f(v.mean())
    return out


def _slo_for(rec: RequestRecord, slo_ttft_s) -> Optional[float]:
    if rec.slo_ttft_s is not None:
        return rec.slo_ttft_s
    if isinstance(slo_ttft_s, Mapping):
        return slo_ttft_s.get(rec.model)
    return slo_ttft_s


def _block(recs: Sequence[RequestRecord], duration_s: Optional[float], slo_ttft_s) -> Dict[str, Any]:
    fin = [r for r in recs if r.status == "finished"]
    counts = {s: sum(1 for r in recs if r.status == s) for s in STATUSES}
    slo_n = met = 0
    for r in recs:
        slo = _slo_for(r, slo_ttft_s)
        if slo is None:
            continue
        slo_n += 1
        met += bool(r.status == "finished" and r.ttft_s is not None and r.ttft_s < slo)
    out_tokens = sum(r.num_output_tokens for r in fin)
    prompt_tokens = sum(r.prompt_len for r in fin)
    rate = (lambda n: n / duration_s) if duration_s else (lambda n: None)
    reasons: Dict[str, int] = {}
    for r in recs:
        k = r.finish_reason or r.status
        reasons[k] = reasons.get(k, 0) + 1
    return {
        "requests": len(recs),
        "finished": counts["finished"],
        "dropped": counts["dropped"],
        "failed": counts["failed"],
        "ttft_s": latency_stats([r.ttft_s for r in fin]),
        "tpot_s": latency_stats([r.tpot_s for r in fin if r.tpot_s is not None]),
        "e2e_s": latency_stats([r.e2e_s for r in fin]),
        "itl_s": latency_stats([x for r in fin for x in r.itl_s]),
        "slo_attainment": (met / slo_n) if slo_n else None,
        "slo_requests": slo_n,
        "slo_met": met,
        "goodput_rps": rate(met) if slo_n else None,
        "request_throughput_rps": rate(len(fin)),
        "output_tokens": out_tokens,
        "output_tokens_per_s": rate(out_tokens),
        "prompt_tokens_per_s": rate(prompt_tokens),
        "preemptions": sum(r.preemptions for r in recs),
        # Share of the finished requests' prompt tokens that came from the prefix cache.
        "prefix_hit_rate": (sum(r.cached_tokens for r in fin) / prompt_tokens) if prompt_tokens else None,
        "finish_reasons": dict(sorted(reasons.items())),
    }


def summarize(
    records: Iterable[RequestRecord],
    duration_s: Optional[float] = None,
    kv_samples: Optional[Sequence[Any]] = None,
    *,
    slo_ttft_s: Union[None, float, Mapping[str, float]] = None,
    presets: Optional[Mapping[str, str]] = None,
    models: Optional[Sequence[str]] = None,
    kv_arena_bytes: Optional[int] = None,
    kv_slab_bytes: Optional[int] = None,
) -> Dict[str, Any]:
    """Per-model and overall metrics as a JSON-friendly dict (see the module docstring).

    duration_s: the run's wall time (default: first arrival to last finish/arrival).
    presets: model -> preset name (else taken from the records' `preset`).
    models: names to include even with no records (all-zero blocks).
    kv_samples: if given, a "kv" section from `kv_summary` is added.
    """
    recs = list(records)
    if duration_s is None:
        if recs:
            t0 = min(r.arrival_s for r in recs)
            t1 = max(max(r.finish_s or r.arrival_s, r.first_token_s or r.arrival_s) for r in recs)
            duration_s = t1 - t0
        else:
            duration_s = 0.0
    if duration_s < 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s}")
    by_model: Dict[str, List[RequestRecord]] = {m: [] for m in (models or [])}
    for r in recs:
        by_model.setdefault(r.model, []).append(r)
    out_models = {}
    for name in sorted(by_model):
        rs = by_model[name]
        preset = (presets or {}).get(name)
        if preset is None:
            ps = sorted({r.preset for r in rs if r.preset is not None})
            preset = ps[0] if len(ps) == 1 else ("mixed" if ps else None)
        out_models[name] = {"preset": preset, **_block(rs, duration_s, slo_ttft_s)}
    overall = _block(recs, duration_s, slo_ttft_s)
    overall["duration_s"] = float(duration_s)
    overall["num_models"] = len(out_models)
    summary = {"models": out_models, "overall": overall}
    if kv_samples is not None:
        summary["kv"] = kv_summary(kv_samples, arena_bytes=kv_arena_bytes, slab_bytes=kv_slab_bytes)
    return summary


def prefix_cache_summary(stats: Optional[Mapping[str, Any]],
                         records: Iterable[RequestRecord]) -> Dict[str, Any]:
    """The "prefix_cache" section: hit_rate (cached prompt tokens / prompt tokens of the
    finished requests), hit_blocks, saved_prefill_tokens (prefill skipped thanks to hits,
    recomputations after preemption included), idle_cached_bytes (cached blocks no request
    maps at the end), evicted/registered blocks. `stats`: the scheduler's counters, None
    when caching is off."""
    fin = [r for r in records if r.status == "finished"]
    prompt = sum(r.prompt_len for r in fin)
    out: Dict[str, Any] = {"enabled": stats is not None,
                           "hit_rate": (sum(r.cached_tokens for r in fin) / prompt) if prompt else None}
    s = stats or {}
    out.update({"hit_blocks": s.get("hit_blocks", 0),
                "saved_prefill_tokens": s.get("hit_tokens", 0),
                "idle_cached_bytes": s.get("idle_bytes", 0),
                "evicted_blocks": s.get("evicted_blocks", 0),
                "registered_blocks": s.get("registered_blocks", 0)})
    return out


def _parse_kv_sample(s):
    """-> (t or None, used, reserved or None)."""
    if isinstance(s, Mapping):
        t = s.get("t", s.get("time_s"))
        return (None if t is None else float(t), float(s["used_bytes"]),
                None if s.get("reserved_bytes") is None else float(s["reserved_bytes"]))
    if isinstance(s, (tuple, list)):
        if len(s) == 2:
            return float(s[0]), float(s[1]), None
        if len(s) == 3:
            return float(s[0]), float(s[1]), float(s[2])
        raise ValueError(f"KV sample must be (t, used) or (t, used, reserved), got {s!r}")
    return None, float(s), None


def kv_summary(
    samples: Sequence[Any],
    *,
    arena_bytes: Optional[int] = None,
    slab_bytes: Optional[int] = None,
    end_s: Optional[float] = None,
) -> Dict[str, Any]:
    """The "kv" section from samples of KV memory in use.

    A sample is a number (used bytes), a tuple (t, used[, reserved]) or a dict with
    "t"/"time_s", "used_bytes" and optionally "reserved_bytes" (bytes held by formatted
    slabs, in use or not). With times, means are time-weighted (each sample holds until
    the next; the last until `end_s`, or gets zero weight); without, plain means.
    waste_fraction = 1 - mean used / mean reserved (the slab-internal fragmentation), None
    without reserved bytes. mean_utilization = mean used / arena_bytes.
    """
    parsed = [_parse_kv_sample(s) for s in samples]
    out: Dict[str, Any] = {
        "arena_bytes": None if arena_bytes is None else int(arena_bytes),
        "slab_bytes": None if slab_bytes is None else int(slab_bytes),
        "num_samples": len(parsed),
        "peak_used_bytes": None, "mean_used_bytes": None,
        "peak_reserved_bytes": None, "mean_reserved_bytes": None,
        "waste_fraction": None, "mean_utilization": None,
    }
    if not parsed:
        return out
    used = np.array([p[1] for p in parsed])
    have_res = all(p[2] is not None for p in parsed)
    res = np.array([p[2] for p in parsed]) if have_res else None
    times = [p[0] for p in parsed]
    if all(t is not None for t in times) and len(parsed) > 1:
        t = np.array(times)
        order = np.argsort(t, kind="stable")
        t, used = t[order], used[order]
        res = res[order] if res is not None else None
        w = np.diff(np.append(t, end_s if end_s is not None else t[-1]))
        if np.any(w < 0):
            raise ValueError("end_s is before the last KV sample")
        if w.sum() <= 0:
            w = np.ones_like(used)
    else:
        w = np.ones_like(used)
    mean = lambda x: float(np.sum(x * w) / np.sum(w))  # noqa: E731
    out["peak_used_bytes"] = float(used.max())
    out["mean_used_bytes"] = mean(used)
    if res is not None:
        out["peak_reserved_bytes"] = float(res.max())
        out["mean_reserved_bytes"] = mean(res)
        mr = out["mean_reserved_bytes"]
        out["waste_fraction"] = (1.0 - out["mean_used_bytes"] / mr) if mr > 0 else None
    if arena_bytes:
        out["mean_utilization"] = out["mean_used_bytes"] / float(arena_bytes)
    return out


def check_conservation(summary: Mapping[str, Any]) -> None:
    """Raise ConservationError unless requests == finished + dropped + failed for every
    model and overall, and the overall counts are the sums over models."""
    problems = []
    blocks = list(summary.get("models", {}).items()) + [("overall", summary.get("overall", {}))]
    for name, b in blocks:
        try:
            n, s = b["requests"], b["finished"] + b["dropped"] + b["failed"]
        except KeyError as e:
            problems.append(f"{name}: missing count {e}")
            continue
        if n != s:
            problems.append(f"{name}: requests={n} != finished+dropped+failed={s} "
                            f"({b['finished']}+{b['dropped']}+{b['failed']})")
    if summary.get("models") and "overall" in summary:
        for k in ("requests", "finished", "dropped", "failed"):
            tot = sum(b.get(k, 0) for b in summary["models"].values())
            if summary["overall"].get(k) != tot:
                problems.append(f"overall {k}={summary['overall'].get(k)} != sum over models {tot}")
    if problems:
        raise ConservationError("request conservation violated: " + "; ".join(problems))


def _fmt(x, scale=1.0, digits=3) -> str:
    if x is None:
        return "-"
    return f"{x * scale:.{digits}f}"


def format_table(summary: Mapping[str, Any]) -> str:
    """A fixed-width table of the per-model and overall metrics (latencies in ms)."""
    cols = [("model", 16, "<"), ("preset", 8, "<"), ("req", 6, ">"), ("fin", 6, ">"),
            ("drop", 5, ">"), ("fail", 5, ">"), ("ttft50ms", 9, ">"), ("ttft99ms", 9, ">"),
            ("tpot50ms", 9, ">"), ("tpot99ms", 9, ">"), ("e2e50s", 8, ">"), ("slo%", 6, ">"),
            ("goodput", 8, ">"), ("tok/s", 9, ">"), ("preempt", 7, ">")]

    def row(name, b):
        vals = [
            str(name)[:16], str(b.get("preset") or "-")[:8], str(b["requests"]), str(b["finished"]),
            str(b["dropped"]), str(b["failed"]),
            _fmt(b["ttft_s"]["p50"], 1e3, 1), _fmt(b["ttft_s"]["p99"], 1e3, 1),
            _fmt(b["tpot_s"]["p50"], 1e3, 2), _fmt(b["tpot_s"]["p99"], 1e3, 2),
            _fmt(b["e2e_s"]["p50"], 1, 2),
            _fmt(b["slo_attainment"], 100, 1), _fmt(b["goodput_rps"], 1, 2),
            _fmt(b["output_tokens_per_s"], 1, 1), str(b.get("preemptions", 0)),
        ]
        return " ".join(f"{v:{a}{w}}" for v, (_, w, a) in zip(vals, cols))

    header = " ".join(f"{n:{a}{w}}" for n, w, a in cols)
    lines = [header, "-" * len(header)]
    for name, b in summary.get("models", {}).items():
        lines.append(row(name, b))
    if "overall" in summary:
        lines.append("-" * len(header))
        lines.append(row("overall", {**summary["overall"], "preset": ""}))
        d = summary["overall"].get("duration_s")
        if d is not None:
            lines.append(f"duration {d:.2f} s")
    pc = summary.get("prefix_cache")
    if pc and pc.get("enabled"):
        lines.append(f"prefix cache: hit rate {_fmt(pc['hit_rate'], 100, 1)}% of prompt tokens, "
                     f"{pc['hit_blocks']} block hits, {pc['saved_prefill_tokens']} prefill tokens "
                     f"saved, {pc['idle_cached_bytes'] / (1 << 20):.2f} MiB idle cached")
    kv = summary.get("kv")
    if kv and kv.get("peak_used_bytes") is not None:
        mib = 1 / (1 << 20)
        lines.append(
            f"KV: peak used {kv['peak_used_bytes'] * mib:.1f} MiB, mean used {kv['mean_used_bytes'] * mib:.1f} MiB"
            + (f", arena {kv['arena_bytes'] * mib:.1f} MiB" if kv.get("arena_bytes") else "")
            + (f", waste {kv['waste_fraction'] * 100:.1f}%" if kv.get("waste_fraction") is not None else "")
        )
    return "\n".join(lines)

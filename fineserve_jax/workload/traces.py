"""Replay of LLM inference traces in the Azure format. Pure Python (csv module) + numpy.

File format (Azure LLM inference trace 2023, `../shared/data/traces/`):

    TIMESTAMP,ContextTokens,GeneratedTokens
    2023-11-16 18:15:46.6805900,374,44

The header names are matched case-insensitively and in any order; extra columns are allowed.
TIMESTAMP is either a wall-clock time `YYYY-MM-DD[ T]HH:MM:SS[.fraction][Z|+HH:MM]` (any
number of fractional digits; the public trace has 7) or a plain number of seconds. Blank lines
are skipped. Anything else wrong (bad header, wrong number of fields, non-numeric or negative
token counts, an unparseable timestamp) raises `TraceError` naming the file and line number.
Rows are sorted by time (stable) if the file is not; times are relative to the first request.

`replay_trace` selects a window (in trace seconds, before compression), compresses time (a
factor, or rescaling to a target mean rate), and assigns each request to a model at random,
weighted by the models' rates (seeded).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from fineserve_jax.workload.spec import ModelLoad, WorkloadRequest, check_count, check_number

REQUIRED_COLUMNS = ("timestamp", "contexttokens", "generatedtokens")

_TS_RE = re.compile(
    r"^(\d{4})-(\d{1,2})-(\d{1,2})[ T](\d{1,2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"\s*(Z|[+-]\d{2}:?\d{2})?$"
)


class TraceError(ValueError):
    """A malformed trace file; `path` and `line` say where."""

    def __init__(self, path: str, line: Optional[int], msg: str):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {msg}")


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
    """A parsed trace: per request, time since the first request, prompt and output tokens."""

    path: str
    times_s: np.ndarray  # float64, sorted, times_s[0] == 0
    prompt_lens: np.ndarray  # int64
    output_lens: np.ndarray  # int64
    line_numbers: np.ndarray  # int64, the file line each request came from
    first_timestamp: str = ""

    def __len__(self) -> int:
        return int(self.times_s.size)

    @property
    def duration_s(self) -> float:
        return float(self.times_s[-1] - self.times_s[0]) if len(self) else 0.0

    @property
    def mean_rate(self) -> float:
        """Requests per second over the span between the first and last request."""
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else float("nan")

    def window(
        self, start_s: float = 0.0, duration_s: Optional[float] = None, max_requests: Optional[int] = None
    ) -> "Trace":
        """Requests with start_s <= t < start_s + duration_s, at most the first max_requests.

        Times stay in trace seconds (not rebased). A NaN or infinite bound is an error (NaN
        would silently select the whole trace); use None for "no limit"."""
        start_s = check_number("start_s", start_s)
        duration_s = check_number("duration_s", duration_s, 0.0, optional=True)
        max_requests = check_count("max_requests", max_requests, optional=True)
        t = self.times_s
        lo = int(np.searchsorted(t, start_s, side="left"))
        hi = len(self) if duration_s is None else int(np.searchsorted(t, start_s + duration_s, side="left"))
        if max_requests is not None:
            hi = min(hi, lo + max_requests)
        sl = slice(lo, max(lo, hi))
        return Trace(self.path, t[sl], self.prompt_lens[sl], self.output_lens[sl],
                     self.line_numbers[sl], self.first_timestamp)

    def stats(self) -> Dict[str, float]:
        g = np.diff(self.times_s)
        return {
            "requests": len(self),
            "duration_s": self.duration_s,
            "mean_rate_rps": self.mean_rate,
            "interarrival_cv": float(g.std() / g.mean()) if g.size > 1 and g.mean() > 0 else float("nan"),
            "prompt_mean": float(self.prompt_lens.mean()) if len(self) else float("nan"),
            "prompt_median": float(np.median(self.prompt_lens)) if len(self) else float("nan"),
            "prompt_max": int(self.prompt_lens.max()) if len(self) else 0,
            "output_mean": float(self.output_lens.mean()) if len(self) else float("nan"),
            "output_median": float(np.median(self.output_lens)) if len(self) else float("nan"),
            "output_max": int(self.output_lens.max()) if len(self) else 0,
        }


def _parse_int(path, line, name, field) -> int:
    s = field.strip()
    try:
        v = int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            raise TraceError(path, line, f"{name} is not a number: {field!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise TraceError(path, line, f"{name} is not a whole number: {field!r}") from None
        v = int(f)
    if v < 0:
        raise TraceError(path, line, f"{name} is negative: {v}")
    return v


class _TimestampParser:
    """Wall-clock or numeric timestamps -> (day ordinal, seconds of day) pairs."""

    def __init__(self, path):
        self.path = path
        self.mode: Optional[str] = None  # "wall" or "num"
        self._days: Dict[str, int] = {}

    def __call__(self, line: int, field: str):
        s = field.strip()
        m = _TS_RE.match(s)
        if m is not None:
            mode = "wall"
        else:
            try:
                v = float(s)
            except ValueError:
                raise TraceError(self.path, line, f"cannot parse TIMESTAMP {field!r}") from None
            if not math.isfinite(v):
                raise TraceError(self.path, line, f"TIMESTAMP is not finite: {field!r}")
            mode = "num"
        if self.mode is None:
            self.mode = mode
        elif mode != self.mode:
            raise TraceError(
                self.path, line,
                f"TIMESTAMP {field!r} mixes {'wall-clock' if mode == 'wall' else 'numeric'} "
                f"with the file's {'wall-clock' if self.mode == 'wall' else 'numeric'} timestamps",
            )
        if mode == "num":
            return 0, v
        y, mo, d, hh, mi, ss, frac, tz = m.groups()
        key = f"{y}-{mo}-{d}"
        day = self._days.get(key)
        if day is None:
            try:
                day = _dt.date(int(y), int(mo), int(d)).toordinal()
            except ValueError as e:
                raise TraceError(self.path, line, f"bad date in TIMESTAMP {field!r}: {e}") from None
            self._days[key] = day
        h, mi_, sec = int(hh), int(mi), int(ss)
        if h > 23 or mi_ > 59 or sec > 60:
            raise TraceError(self.path, line, f"bad time of day in TIMESTAMP {field!r}")
        sod = h * 3600 + mi_ * 60 + sec + (float("0." + frac) if frac else 0.0)
        if tz and tz != "Z":
            sign = -1 if tz[0] == "-" else 1
            digits = tz[1:].replace(":", "")
            sod -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
        return day, sod


def load_azure_trace(path: Union[str, os.PathLike]) -> Trace:
    """Parse an Azure-format trace CSV (see the module docstring). Raises TraceError."""
    path = os.fspath(path)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise TraceError(path, None, f"cannot open trace: {e}") from None
    days: List[int] = []
    secs: List[float] = []
    prompts: List[int] = []
    outputs: List[int] = []
    lines: List[int] = []
    first_ts = ""
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise TraceError(path, 1, "empty file (expected header TIMESTAMP,ContextTokens,GeneratedTokens)") from None
        except csv.Error as e:
            raise TraceError(path, 1, f"CSV error: {e}") from None
        names = [h.strip().lower() for h in header]
        idx = {}
        for col in REQUIRED_COLUMNS:
            hits = [i for i, n in enumerate(names) if n == col]
            if len(hits) != 1:
                raise TraceError(
                    path, 1,
                    f"bad header {header!r}: expected exactly one column {col!r} "
                    "(header must name TIMESTAMP, ContextTokens, GeneratedTokens)",
                )
            idx[col] = hits[0]
        ncol = len(header)
        i_ts, i_ctx, i_gen = idx["timestamp"], idx["contexttokens"], idx["generatedtokens"]
        parse_ts = _TimestampParser(path)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise TraceError(path, reader.line_num, f"CSV error: {e}") from None
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) != ncol:
                raise TraceError(path, line, f"expected {ncol} fields, got {len(row)}: {row!r}")
            day, sod = parse_ts(line, row[i_ts])
            if not first_ts:
                first_ts = row[i_ts].strip()
            days.append(day)
            secs.append(sod)
            prompts.append(_parse_int(path, line, "ContextTokens", row[i_ctx]))
            outputs.append(_parse_int(path, line, "GeneratedTokens", row[i_gen]))
            lines.append(line)
    d = np.asarray(days, dtype=np.int64)
    s = np.asarray(secs, dtype=np.float64)
    if d.size:
        t = (d - d[0]).astype(np.float64) * 86400.0 + (s - s[0])
    else:
        t = np.zeros(0)
    order = np.argsort(t, kind="stable")
    t = t[order]
    if t.size:
        t = t - t[0]
    return Trace(
        path=path,
        times_s=t,
        prompt_lens=np.asarray(prompts, dtype=np.int64)[order],
        output_lens=np.asarray(outputs, dtype=np.int64)[order],
        line_numbers=np.asarray(lines, dtype=np.int64)[order],
        first_timestamp=first_ts,
    )


ModelsForTrace = Union[Mapping[str, float], Sequence[ModelLoad], Sequence[str]]


def _model_weights(models: ModelsForTrace):
    if isinstance(models, Mapping):
        names = [str(k) for k in models]
        rates = [float(v) for v in models.values()]
        slos = [None] * len(names)
    else:
        models = list(models)
        if models and all(isinstance(m, str) for m in models):
            names, rates, slos = list(models), [1.0] * len(models), [None] * len(models)
        elif all(isinstance(m, ModelLoad) for m in models):
            names = [m.name for m in models]
            rates = [m.rate for m in models]
            slos = [m.slo_ttft_s for m in models]
        else:
            raise TypeError("models must be a dict name -> rate, a list of names, or a list of ModelLoad")
    if not names:
        raise ValueError("replay needs at least one model")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate model names: {names}")
    w = np.asarray(rates, dtype=np.float64)
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"model rates must be >= 0 with a positive sum, got {rates}")
    return names, w / w.sum(), slos


def replay_trace(
    trace: Union[Trace, str, os.PathLike],
    models: ModelsForTrace,
    *,
    time_scale: Optional[float] = None,
    target_rate: Optional[float] = None,
    start_s: float = 0.0,
    duration_s: Optional[float] = None,
    max_requests: Optional[int] = None,
    seed: int = 0,
    slo_ttft_s: Optional[float] = None,
    offset_s: float = 0.0,
    max_prompt_len: Optional[int] = None,
    max_output_len: Optional[int] = None,
) -> List[WorkloadRequest]:
    """Turn a trace (or its path) into workload requests.

    window: requests with start_s <= t < start_s + duration_s (trace seconds, before
      compression), at most the first `max_requests` of them.
    time: arrival = offset_s + (t - start_s) / factor, where factor = `time_scale` (> 1
      compresses) or is chosen so the window's mean rate becomes `target_rate` (the window's
      rate is n / duration_s, or (n - 1) / span when no duration is given). Default factor 1.
    models: dict name -> rate (assignment probability proportional to rate), a list of names
      (uniform), or ModelLoads (rate-weighted, their SLOs kept); seeded by `seed`.
    lengths: prompt/output clipped to max_prompt_len / max_output_len when given; an output
      length of 0 becomes 1.
    """
    if time_scale is not None and target_rate is not None:
        raise ValueError("give at most one of time_scale or target_rate")
    offset_s = check_number("offset_s", offset_s)
    max_prompt_len = check_count("max_prompt_len", max_prompt_len, 1, optional=True)
    max_output_len = check_count("max_output_len", max_output_len, 1, optional=True)
    # (the window's start_s / duration_s / max_requests are checked by Trace.window)
    if not isinstance(trace, Trace):
        trace = load_azure_trace(trace)
    names, probs, slos = _model_weights(models)
    win = trace.window(start_s, duration_s, max_requests)
    n = len(win)
    factor = 1.0
    if time_scale is not None:
        factor = check_number("time_scale", time_scale, 0.0, lo_open=True)
    elif target_rate is not None:
        check_number("target_rate", target_rate, 0.0, lo_open=True)
        if duration_s is not None:
            rate = n / duration_s if duration_s > 0 else float("nan")
        else:
            span = win.duration_s
            rate = (n - 1) / span if span > 0 else float("nan")
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"cannot rescale to target_rate: the window holds {n} request(s)")
        factor = target_rate / rate
    rng = np.random.default_rng(seed)
    which = rng.choice(len(names), size=n, p=probs) if n else np.zeros(0, dtype=np.int64)
    prompt = win.prompt_lens.copy()
    output = np.maximum(win.output_lens, 1)
    if max_prompt_len is not None:
        prompt = np.minimum(prompt, max_prompt_len)
    if max_output_len is not None:
        output = np.minimum(output, max_output_len)
    prompt = np.maximum(prompt, 1)
    arrivals = offset_s + (win.times_s - start_s) / factor
    return [
        WorkloadRequest(
            request_id=j,
            model=names[int(which[j])],
            arrival_s=float(arrivals[j]),
            prompt_len=int(prompt[j]),
            output_len=int(output[j]),
            slo_ttft_s=slos[int(which[j])] if slos[int(which[j])] is not None else slo_ttft_s,
        )
        for j in range(n)
    ]

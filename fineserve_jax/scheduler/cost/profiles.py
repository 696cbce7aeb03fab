"""The profile CSV format: FineServe's per-configuration step-time measurements.

A row (columns `PROFILE_COLUMNS`; shared/data/profiles/*.csv, experiments/profile.py) is one
(model, qformat, tp, mps_percentage) group at one shape: `prefill_time` of a batch of
`batch_size` prompts of `input_len` tokens, and `tpot` = decode_time / (output_len - 1), one
decode step at a context growing from input_len to input_len + output_len, so a decode point
sits at context input_len + output_len / 2 (`ProfilePoint.decode_context`). Each file is one
*source* (a machine), named by its stem.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

PROFILE_COLUMNS = ("model", "qformat", "tp", "mps_percentage", "batch_size", "input_len",
                   "output_len", "seq_len", "prefill_time", "decode_time", "ttft", "tpot", "e2e")
DEFAULT_PROFILE_FILES = ("apex-cost.csv", "aws-cost.csv")
ENV_VAR = "FINESERVE_DATA_DIR"

# Spelling fixes for model names found in profile files.
_NAME_FIXES = {"lama-3-8b": "llama-3-8b", "qwen3-32b": "qwen-3-32b", "llama3.1-8b": "llama-3.1-8b",
               "llama3.1-70b": "llama-3.1-70b", "llama3-8b": "llama-3-8b"}


def canonical_model_name(name: str) -> str:
    n = str(name).strip().lower().replace("_", "-")
    return _NAME_FIXES.get(n, n)


class ProfileFormatError(ValueError):
    pass


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
        root = Path(__file__).resolve().parents[3]  # <repo>/fineserve_jax/scheduler/cost/
        cands = [root.parent / "shared" / "data" / "profiles", root / "shared" / "data" / "profiles"]
    for c in cands:
        if all((c / f).is_file() for f in DEFAULT_PROFILE_FILES):
            return c
    raise FileNotFoundError(
        f"profile CSVs {DEFAULT_PROFILE_FILES} not found in any of {[str(c) for c in cands]} "
        f"(set ${ENV_VAR})"
    )

"""summary.json for a node or a cluster: the single-device schema (`metrics.summarize` +
"kv" + "compile" + "prefix_cache" + "config"), summed over devices (or nodes), with a section
per device (or node). Pure Python: the Ray driver merges node results without JAX.

KV bytes here are physical bytes over every GPU: a tensor-parallel group's allocator counts
the bytes of one GPU (every GPU holds its KV heads of every block), so its samples and its
arena are multiplied by tp.
"""

from __future__ import annotations

import bisect
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from fineserve_jax import metrics
from fineserve_jax.metrics import RequestRecord

Sample = Tuple[float, float, float]  # (t, used bytes, reserved bytes)


def merge_kv_samples(series: Sequence[Tuple[Sequence[Sample], float]]) -> List[Sample]:
    """The sum of several KV time series, each (samples on one clock, scale): at every time any
    series has a sample, the sum of each series' latest sample (0 before its first), scaled."""
    series = [(sorted(s), k) for s, k in series if s]
    times = sorted({t for s, _ in series for t, _, _ in s})
    out = []
    for t in times:
        used = res = 0.0
        for s, k in series:
            i = bisect.bisect_right([x[0] for x in s], t) - 1
            if i >= 0:
                used += s[i][1] * k
                res += s[i][2] * k
        out.append((t, used, res))
    return out


def sum_counts(dicts: Iterable[Optional[Mapping[str, Any]]]) -> Optional[Dict[str, Any]]:
    """Key-wise sums of numeric dicts (None entries skipped; None when all are None)."""
    ds = [d for d in dicts if d is not None]
    if not ds:
        return None
    keys = [k for k in ds[0] if all(isinstance(d.get(k), (int, float)) for d in ds)]
    return {k: sum(d[k] for d in ds) for k in keys}


def failed_record(request_id: int, model: str, arrival_s: float, reason: str,
                  slo_ttft_s: Optional[float] = None, prompt_len: int = 0,
                  preset: Optional[str] = None) -> RequestRecord:
    """The record of a request that failed before (or without) being served."""
    return RequestRecord(request_id, model, arrival_s, finish_s=arrival_s, status="failed",
                         finish_reason=reason, slo_ttft_s=slo_ttft_s, prompt_len=prompt_len,
                         preset=preset)


def merged_summary(records: Sequence[RequestRecord], *, duration_s: float,
                   kv_samples: Sequence[Sample], kv_arena_bytes: int,
                   slab_bytes: Sequence[int], presets: Mapping[str, str], models: Sequence[str],
                   slos: Mapping[str, Optional[float]], sections: Sequence[Mapping[str, Any]],
                   prefix_cache: Optional[Mapping[str, Any]], compile_info: Mapping[str, Any],
                   config: Mapping[str, Any], section_key: str) -> Dict[str, Any]:
    """One summary over several devices or nodes. `sections`: their own sections (each with
    "kv" and, for devices, the engine's counters), stored under `section_key`."""
    slabs = set(slab_bytes)
    s = metrics.summarize(
        records, duration_s=duration_s, kv_samples=kv_samples,
        slo_ttft_s={n: v for n, v in slos.items() if v is not None},
        presets=dict(presets), models=list(models), kv_arena_bytes=kv_arena_bytes,
        kv_slab_bytes=slabs.pop() if len(slabs) == 1 else None)
    kvs = [sec["kv"] for sec in sections if sec.get("kv")]
    s["kv"]["num_slabs"] = sum(k.get("num_slabs") or 0 for k in kvs)
    s["kv"]["preemptions"] = sum(k.get("preemptions") or 0 for k in kvs)
    s["kv"]["compaction"] = sum_counts(k.get("compaction") for k in kvs) or {}
    s["prefix_cache"] = metrics.prefix_cache_summary(prefix_cache, records)
    s["compile"] = dict(compile_info)
    s["config"] = dict(config)
    s[section_key] = list(sections)
    metrics.check_conservation(s)
    return s

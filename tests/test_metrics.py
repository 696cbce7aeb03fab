"""Serving metrics on hand-computed records (no JAX)."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from fineserve_jax import metrics as M
from fineserve_jax.metrics import (
    ConservationError,
    RequestRecord,
    RequestTracker,
    check_conservation,
    format_table,
    kv_summary,
    latency_stats,
    summarize,
)


def _records():
    return [
        # 4 tokens: TTFT 1.0, E2E 3.0, TPOT (3-1)/3, ITL 0.5, 0.5, 1.0
        RequestRecord(0, "a", 0.0, token_times_s=[1.0, 1.5, 2.0, 3.0], slo_ttft_s=0.5,
                      prompt_len=10, preset="awq", finish_reason="eos", preemptions=1),
        # 1 token: TTFT 0.2, E2E 0.2, no TPOT
        RequestRecord(1, "a", 1.0, token_times_s=[1.2], slo_ttft_s=0.5, prompt_len=20, preset="awq",
                      finish_reason="length"),
        # dropped (SLO): counts as missed
        RequestRecord(2, "a", 2.0, status="dropped", finish_reason="slo", slo_ttft_s=0.5, preset="awq"),
        # model b: finished without token times (first_token_s/finish_s only), failed one
        RequestRecord(3, "b", 0.0, first_token_s=0.1, finish_s=1.1, num_output_tokens=11, prompt_len=5),
        RequestRecord(4, "b", 0.5, status="failed", finish_reason="oom"),
    ]


def test_no_jax_imports():
    tree = ast.parse(Path(M.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] in ("jax", "flax") for n in names)


def test_per_request_latencies():
    r0, r1, r2, r3, r4 = _records()
    assert (r0.ttft_s, r0.e2e_s, r0.num_output_tokens) == (1.0, 3.0, 4)
    assert r0.tpot_s == pytest.approx(2.0 / 3.0)
    assert r0.itl_s == pytest.approx([0.5, 0.5, 1.0])
    assert r1.tpot_s is None and r1.ttft_s == pytest.approx(0.2)
    assert r2.ttft_s is None and r2.met_slo() is False
    assert r3.tpot_s == pytest.approx(0.1) and r3.itl_s == []
    assert r0.met_slo() is False and r1.met_slo() is True and r3.met_slo() is None


def test_summary_hand_computed():
    s = summarize(_records(), duration_s=10.0, slo_ttft_s={"b": 0.15})
    a, b, o = s["models"]["a"], s["models"]["b"], s["overall"]
    assert (a["preset"], a["requests"], a["finished"], a["dropped"], a["failed"]) == ("awq", 3, 2, 1, 0)
    # TTFT over finished requests [1.0, 0.2]: numpy linear percentiles
    assert a["ttft_s"] == pytest.approx({"p50": 0.6, "p90": 0.92, "p99": 0.992, "mean": 0.6})
    # TPOT: only the 4-token request (the 1-token one is excluded)
    assert a["tpot_s"] == pytest.approx({k: 2 / 3 for k in ("p50", "p90", "p99", "mean")})
    assert a["itl_s"]["p50"] == pytest.approx(0.5) and a["itl_s"]["mean"] == pytest.approx(2 / 3)
    assert a["e2e_s"]["mean"] == pytest.approx(1.6)
    # SLO 0.5: r0 missed (TTFT 1.0), r1 met, r2 dropped = missed
    assert a["slo_attainment"] == pytest.approx(1 / 3) and a["slo_requests"] == 3 and a["slo_met"] == 1
    assert a["goodput_rps"] == pytest.approx(0.1)
    assert a["request_throughput_rps"] == pytest.approx(0.2)
    assert a["output_tokens_per_s"] == pytest.approx(0.5)
    assert a["prompt_tokens_per_s"] == pytest.approx(3.0)
    assert a["preemptions"] == 1
    assert a["finish_reasons"] == {"eos": 1, "length": 1, "slo": 1}
    # model b: default SLO from the dict (0.15): r3 met (0.1 < 0.15), r4 failed = missed
    assert b["preset"] is None and b["slo_attainment"] == pytest.approx(0.5)
    assert b["itl_s"]["p50"] is None  # no token times
    # overall
    assert (o["requests"], o["finished"], o["dropped"], o["failed"]) == (5, 3, 1, 1)
    assert o["slo_attainment"] == pytest.approx(2 / 5)
    assert o["goodput_rps"] == pytest.approx(0.2)
    assert o["output_tokens_per_s"] == pytest.approx(1.6)
    assert o["duration_s"] == 10.0
    check_conservation(s)
    json.dumps(s, allow_nan=False)  # JSON-friendly, no NaN


def test_mutations_change_attainment_and_break_conservation():
    base = summarize(_records(), duration_s=10.0)
    assert base["models"]["a"]["slo_attainment"] == pytest.approx(1 / 3)
    def late(t):
        return dataclasses.replace(_records()[1], token_times_s=[t], first_token_s=None, finish_s=None)

    recs = _records()
    recs[1] = late(1.6)  # TTFT 0.6 > SLO 0.5
    assert summarize(recs, duration_s=10.0)["models"]["a"]["slo_attainment"] == 0.0
    recs[1] = late(1.5)  # TTFT == SLO: strict <, missed
    assert summarize(recs, duration_s=10.0)["models"]["a"]["slo_attainment"] == 0.0
    with pytest.raises(ValueError, match="disagree"):  # stale derived fields are caught
        dataclasses.replace(_records()[1], token_times_s=[1.6])
    bad = json.loads(json.dumps(base))
    bad["models"]["a"]["finished"] += 1
    with pytest.raises(ConservationError, match="a: requests=3"):
        check_conservation(bad)
    bad = json.loads(json.dumps(base))
    bad["overall"]["requests"] += 1
    bad["overall"]["failed"] += 1
    with pytest.raises(ConservationError, match="sum over models"):
        check_conservation(bad)


def test_empty_and_missing():
    s = summarize([], duration_s=5.0, models=["x"])
    x = s["models"]["x"]
    assert x["requests"] == 0 and x["ttft_s"] == {"p50": None, "p90": None, "p99": None, "mean": None}
    assert x["slo_attainment"] is None and x["goodput_rps"] is None
    assert x["request_throughput_rps"] == 0.0
    check_conservation(s)
    json.dumps(s, allow_nan=False)
    assert latency_stats([]) == {"p50": None, "p90": None, "p99": None, "mean": None}
    s0 = summarize(_records())  # duration inferred: first arrival 0 .. last finish 3.0
    assert s0["overall"]["duration_s"] == pytest.approx(3.0)
    assert summarize([], duration_s=0.0)["overall"]["request_throughput_rps"] is None
    assert "table" not in format_table(s)  # renders with None values
    assert "x" in format_table(s)


def test_record_validation():
    with pytest.raises(ValueError, match="status"):
        RequestRecord(0, "a", 0.0, status="lost")
    with pytest.raises(ValueError, match="finished request needs"):
        RequestRecord(0, "a", 0.0)
    with pytest.raises(ValueError, match="before arrival"):
        RequestRecord(0, "a", 1.0, token_times_s=[0.5])
    with pytest.raises(ValueError, match="non-decreasing"):
        RequestRecord(0, "a", 0.0, token_times_s=[1.0, 0.9])


def test_tracker():
    tr = RequestTracker()
    tr.arrive(0, "a", 0.0, slo_ttft_s=1.0, prompt_len=3, preset="org")
    tr.arrive(1, "a", 0.5)
    tr.arrive(2, "b", 0.7)
    tr.token(0, 0.4)
    tr.preempt(0)
    tr.token(0, 0.9)
    tr.token(0, 1.1, n=2)
    tr.finish(0, 1.1, reason="length")
    tr.finish(1, 2.0, status="dropped", reason="slo")
    with pytest.raises(ConservationError, match="never ended"):
        tr.records()
    tr.finish(2, 2.5, status="failed", reason="oom")
    with pytest.raises(ValueError, match="ended twice"):
        tr.finish(2, 3.0, status="failed")
    with pytest.raises(ValueError, match="already ended"):
        tr.token(0, 5.0)
    with pytest.raises(ValueError, match="arrived twice"):
        tr.arrive(1, "a", 0.0)
    recs = tr.records()
    r0 = recs[0]
    assert (r0.ttft_s, r0.e2e_s, r0.num_output_tokens, r0.preemptions) == (0.4, 1.1, 4, 1)
    assert r0.itl_s == pytest.approx([0.5, 0.2, 0.0])
    s = summarize(recs, duration_s=2.5)
    check_conservation(s)
    assert s["overall"]["finished"] == 1 and s["overall"]["dropped"] == 1 and s["overall"]["failed"] == 1
    assert s["models"]["a"]["preset"] == "org"
    with pytest.raises(ValueError, match="finished request needs"):
        t2 = RequestTracker()
        t2.arrive(9, "a", 0.0)
        t2.finish(9, 1.0)  # finished with no tokens


def test_kv_summary():
    samples = [(0.0, 100, 200), (1.0, 300, 400), (3.0, 100, 400)]
    kv = kv_summary(samples, arena_bytes=1000, slab_bytes=50, end_s=4.0)  # weights 1, 2, 1
    assert kv["peak_used_bytes"] == 300 and kv["peak_reserved_bytes"] == 400
    assert kv["mean_used_bytes"] == pytest.approx(200.0)
    assert kv["mean_reserved_bytes"] == pytest.approx(350.0)
    assert kv["waste_fraction"] == pytest.approx(1 - 200 / 350)
    assert kv["mean_utilization"] == pytest.approx(0.2)
    assert (kv["arena_bytes"], kv["slab_bytes"]) == (1000, 50)
    plain = kv_summary([10, 20, 30])
    assert plain["mean_used_bytes"] == pytest.approx(20) and plain["waste_fraction"] is None
    d = kv_summary([{"t": 0, "used_bytes": 5, "reserved_bytes": 10}, {"t": 2, "used_bytes": 15, "reserved_bytes": 20}])
    assert d["mean_used_bytes"] == 5  # last sample has zero weight without end_s
    assert kv_summary([])["peak_used_bytes"] is None
    s = summarize(_records(), duration_s=10.0, kv_samples=samples, kv_arena_bytes=1000)
    assert s["kv"]["arena_bytes"] == 1000 and "KV: peak used" in format_table(s)


def test_format_table():
    s = summarize(_records(), duration_s=10.0, slo_ttft_s=0.5)
    t = format_table(s)
    lines = t.splitlines()
    assert lines[0].split()[:3] == ["model", "preset", "req"]
    assert any(line.startswith("a ") and "awq" in line and "33.3" in line for line in lines)
    assert any(line.startswith("overall") for line in lines)
    assert len({len(line) for line in lines[:4]}) == 1  # fixed width

"""The simulator's experiment scripts run end to end with tiny flags and write their files in
the documented schema. The engine-backed ones (profile, validate_sim) are marked slow."""

import csv
import json
import os
import subprocess
import sys

import pytest

from fineserve_jax import metrics
from fineserve_jax.scheduler.plan import PlacementPlan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def check_summary(path):
    with open(path) as f:
        s = json.load(f)
    for key in ("models", "overall", "kv", "compile", "placement", "sim"):
        assert key in s, key
    metrics.check_conservation(s)
    assert s["compile"]["steady_state_compiles"] is None  # simulated: nothing was compiled
    PlacementPlan.from_dict(s["placement"])
    return s


def test_simulate_with_tiny_flags(tmp_path):
    out = run("experiments.simulate", "--fleet=pair8b", "--duration_s=5", "--workers=1",
              f"--output_dir={tmp_path}")
    s = check_summary(tmp_path / "summary.json")
    assert s["overall"]["requests"] > 20 and set(s["models"]) == {"llama8b-org", "llama8b-fp8"}
    PlacementPlan.load(tmp_path / "plan.json")
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert "simulated 1 GPUs" in out


def test_simulate_replays_a_trace_with_only_trace_and_output_dir(tmp_path):
    trace = tmp_path / "trace.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:15:{i // 2:02d}.{(i % 2) * 5}000000,{100 + 37 * i},{5 + i % 30}" for i in range(60)]
    trace.write_text("\n".join(rows) + "\n")
    run("experiments.simulate", f"--trace={trace}", f"--output_dir={tmp_path / 'out'}")
    s = check_summary(tmp_path / "out" / "summary.json")
    assert s["overall"]["requests"] == 60
    assert s["config"]["trace"] == str(trace)


def test_simulate_runs_a_given_plan_with_a_baseline_system(tmp_path):
    run("experiments.placement", "--fleet=pair8b", "--policies=muxserve", f"--output_dir={tmp_path}")
    plan = tmp_path / "plan_muxserve.json"
    run("experiments.simulate", "--fleet=pair8b", f"--plan={plan}", "--system=muxserve",
        "--duration_s=3", "--workers=1", f"--output_dir={tmp_path / 'sim'}")
    s = check_summary(tmp_path / "sim" / "summary.json")
    assert s["kv"]["mode"] == "static" and s["sim"]["scheduler"]["execution"] == "round_robin"


def test_placement_writes_a_plan_per_policy(tmp_path):
    out = run("experiments.placement", "--fleet=mixed8", f"--output_dir={tmp_path}", "--new_rate_scale=2")
    for policy in ("fineserve", "muxserve", "prism", "spatial"):
        PlacementPlan.load(tmp_path / f"plan_{policy}.json")
        assert f"placement '{policy}'" in out
    with open(tmp_path / "placement.json") as f:
        assert set(json.load(f)["policies"]) == {"fineserve", "muxserve", "prism", "spatial"}


def test_paper_figures_quick(tmp_path):
    out = run("experiments.paper_figures", "--quick", "--scenarios=pair8b",
              "--systems=fineserve,muxserve", "--slo_systems=fineserve", "--ablations=fineserve-static",
              "--workers=1",
              f"--output_dir={tmp_path}")
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["sweep"] for r in rows} == {"rate", "slo", "ablation"}
    assert all(r["error"] == "" for r in rows)
    with open(tmp_path / "ratios.json") as f:
        rt = json.load(f)
    assert rt["pair8b"]["points"] and rt["paper_claims"] == {"slo_ratio": 2.2, "throughput_ratio": 1.8}
    assert (tmp_path / "pair8b.png").stat().st_size > 0
    assert "FineServe / muxserve" in out


@pytest.mark.slow
def test_profile_writes_the_fineserve_columns(tmp_path):
    path = tmp_path / "p.csv"
    run("experiments.profile", "--models=tiny-llama:org", "--batch_sizes=1,2", "--input_lens=16,32",
        "--reps=1", f"--output={path}", timeout=900)
    from fineserve_jax.scheduler.cost import PROFILE_COLUMNS as COLUMNS, CostModel

    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 4
    cm = CostModel.from_csv(path)
    assert cm.prefill_time("tiny-llama", "org", 32) > 0


@pytest.mark.slow
def test_validate_sim_reports_errors(tmp_path):
    # One model: its slab is the 64 KiB target (no common multiple of several block sizes), so
    # the default 0.12 MiB arena would hold a single usable slab (refused, by name).
    run("experiments.validate_sim", "--models=tiny-llama:org", "--rates=5", "--num_requests=20",
        "--batch_sizes=1,2", "--input_lens=16,32", "--reps=1", "--arena_mb=0.5",
        f"--output_dir={tmp_path}", timeout=900)
    with open(tmp_path / "validation.json") as f:
        v = json.load(f)
    assert v["overall"]["engine"]["finished"] + v["overall"]["engine"]["dropped"] == 20
    assert v["overall"]["error"]["ttft_p50_s"] is not None

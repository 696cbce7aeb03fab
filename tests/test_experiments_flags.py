"""Simulator and placement flags: nonsense values are usage errors naming the flag, before any
work; a trace replays whole unless a window is asked for, and a window says what it leaves out;
the workload library refuses the same values with ValueErrors naming the argument.

The flag checks are called in-process (`experiments.flag_checks` defines no flags); a few
subprocess runs (no JAX, ~0.5 s each) prove each script calls them first."""

import math
import os
import subprocess
import sys
import time

import pytest
from absl import app

from experiments.flag_checks import (
    DEFAULT_MAX_WORKLOAD_REQUESTS,
    check_paper_figures_flags,
    check_placement_flags,
    check_simulate_flags,
    check_trace_window,
)
from fineserve_jax.workload.spec import generate_workload
from fineserve_jax.workload.traces import load_azure_trace, replay_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIMULATE = dict(fleet="mixed8", system="fineserve", rate_scale=1.0, duration_s=None, num_requests=0,
                cv=1.0, trace=None, trace_start_s=0.0, trace_time_scale=None, trace_target_rate=None,
                slo_scale=40.0, max_model_len=None, nodes=0, gpus_per_node=0, gpu_memory_gib=0.0,
                workers=2, max_workload_requests=DEFAULT_MAX_WORKLOAD_REQUESTS)
PLACEMENT = dict(fleet="mixed8", policies=["fineserve", "muxserve"], rate_scale=1.0,
                 new_rate_scale=0.0, slo_scale=40.0, max_model_len=4096, nodes=0, gpus_per_node=0,
                 gpu_memory_gib=0.0)
NAN, INF = math.nan, math.inf


def test_defaults_pass():
    check_simulate_flags(**SIMULATE)
    check_simulate_flags(**{**SIMULATE, "trace": "t.csv", "duration_s": 60.0, "num_requests": 10,
                            "trace_target_rate": 5.0})
    check_placement_flags(**PLACEMENT)
    check_paper_figures_flags(scenarios=["pair8b"], valid_scenarios=["pair8b", "mixed8"],
                              systems=["fineserve"], slo_systems=[], ablations=[], workers=1)


@pytest.mark.parametrize("flag,value", [
    ("slo_scale", 0.0), ("slo_scale", -1.0), ("slo_scale", NAN), ("slo_scale", INF),
    ("rate_scale", 0.0), ("rate_scale", -2.0), ("rate_scale", NAN),
    ("rate_scale", 1e9),  # the issue: a 71 GiB MemoryError; now refused from rate x duration
    ("duration_s", 0.0), ("duration_s", -5.0), ("duration_s", NAN), ("duration_s", INF),
    ("num_requests", -1), ("num_requests", 10**9),
    ("max_model_len", 0), ("max_model_len", -1),
    ("cv", 0.0), ("cv", NAN),
    ("nodes", -1), ("gpus_per_node", -1), ("gpu_memory_gib", -1.0), ("gpu_memory_gib", NAN),
    ("gpu_memory_gib", 1e300),  # was an OverflowError converting to bytes
    ("workers", -1), ("max_workload_requests", 0),
    ("fleet", "nope"), ("system", "nope"),
    ("trace_start_s", 5.0), ("trace_time_scale", 2.0), ("trace_target_rate", 3.0),  # need --trace
])
def test_simulate_refuses_nonsense_naming_the_flag(flag, value):
    with pytest.raises(app.UsageError, match=f"^--{flag}: "):
        check_simulate_flags(**{**SIMULATE, flag: value})


@pytest.mark.parametrize("flag,value", [
    ("trace_start_s", -1.0), ("trace_start_s", NAN), ("trace_time_scale", 0.0),
    ("trace_time_scale", NAN), ("trace_target_rate", -1.0), ("trace_target_rate", INF),
    ("duration_s", 0.0), ("duration_s", NAN),
])
def test_simulate_refuses_nonsense_trace_windows(flag, value):
    with pytest.raises(app.UsageError, match=f"^--{flag}: "):
        check_simulate_flags(**{**SIMULATE, "trace": "t.csv", flag: value})


def test_simulate_request_estimate_and_conflicts():
    # mixed8 is ~21.7 req/s: 300 s default window ~ 6,500 requests.
    check_simulate_flags(**{**SIMULATE, "max_workload_requests": 7000})
    with pytest.raises(app.UsageError, match=r"--rate_scale: .* about 6.5\de\+03 requests"):
        check_simulate_flags(**{**SIMULATE, "max_workload_requests": 6000})
    with pytest.raises(app.UsageError, match="--rate_scale: .*--duration_s=1000"):
        check_simulate_flags(**{**SIMULATE, "duration_s": 1000.0, "max_workload_requests": 20_000})
    with pytest.raises(app.UsageError, match="^--rate_scale: "):
        check_simulate_flags(**{**SIMULATE, "rate_scale": 1e308})  # rate x duration overflows
    with pytest.raises(app.UsageError, match="^--duration_s: give at most one"):
        check_simulate_flags(**{**SIMULATE, "duration_s": 10.0, "num_requests": 5})
    with pytest.raises(app.UsageError, match="^--trace_target_rate: give at most one"):
        check_simulate_flags(**{**SIMULATE, "trace": "t.csv", "trace_time_scale": 2.0,
                                "trace_target_rate": 2.0})
    with pytest.raises(app.UsageError, match="^--trace: the replayed window holds 11 requests"):
        check_trace_window(11, 10)


@pytest.mark.parametrize("flag,value", [
    ("slo_scale", 0.0), ("slo_scale", NAN), ("rate_scale", 0.0), ("rate_scale", NAN),
    ("new_rate_scale", -1.0), ("new_rate_scale", NAN), ("max_model_len", 0), ("max_model_len", -1),
    ("policies", []), ("policies", ["fineserve", "best"]), ("fleet", "x"), ("nodes", -1),
    ("gpu_memory_gib", INF),
])
def test_placement_refuses_nonsense_naming_the_flag(flag, value):
    with pytest.raises(app.UsageError, match=f"^--{flag}: "):
        check_placement_flags(**{**PLACEMENT, flag: value})


@pytest.mark.parametrize("kw,flag", [
    (dict(scenarios=[]), "scenarios"), (dict(scenarios=["nope"]), "scenarios"),
    (dict(systems=["fineserve", "vllm"]), "systems"), (dict(slo_systems=["x"]), "slo_systems"),
    (dict(ablations=["x"]), "ablations"), (dict(workers=-1), "workers"),
])
def test_paper_figures_refuses_unknown_names_before_simulating(kw, flag):
    args = dict(scenarios=["pair8b"], valid_scenarios=["pair8b"], systems=["fineserve"],
                slo_systems=[], ablations=[], workers=1)
    with pytest.raises(app.UsageError, match=f"^--{flag}: "):
        check_paper_figures_flags(**{**args, **kw})


def run_script(module, *args, ok=True):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("module,args,flag", [
    ("experiments.simulate", ["--slo_scale=0"], "--slo_scale"),
    ("experiments.simulate", ["--rate_scale=1e9"], "--rate_scale"),
    ("experiments.simulate", ["--max_model_len=-1"], "--max_model_len"),
    ("experiments.placement", ["--slo_scale=nan"], "--slo_scale"),
    ("experiments.paper_figures", ["--quick", "--systems=fineserve,vllm"], "--systems"),
    ("experiments.cpu_bench", ["--scenarios=fixed,mixd"], "--scenarios"),
    ("experiments.cpu_bench", ["--num_prompts=32,0"], "--num_prompts"),
    ("experiments.cpu_bench", ["--new_tokens=0"], "--new_tokens"),
])
def test_scripts_check_flags_before_any_work(tmp_path, module, args, flag):
    out = tmp_path / "out"
    text = run_script(module, *args, f"--output_dir={out}", ok=False)
    assert f"{flag}: " in text and "Traceback" not in text
    assert not out.exists()  # nothing was written: refused before any work


@pytest.fixture(scope="module")
def long_trace(tmp_path_factory):
    """40 requests, one every 10 s: 390 s of trace, longer than the old 300 s default."""
    path = tmp_path_factory.mktemp("trace") / "trace.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"{10.0 * i},{50 + i},{3 + i % 5}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_simulate_replays_the_whole_trace_by_default_and_prints_windows(tmp_path, long_trace):
    import json

    out = run_script("experiments.simulate", f"--trace={long_trace}", "--fleet=pair8b", "--workers=1",
                     f"--output_dir={tmp_path / 'all'}")
    assert "replaying all 40 requests (390.0 trace s)" in out
    with open(tmp_path / "all" / "summary.json") as f:
        assert json.load(f)["overall"]["requests"] == 40  # was 30: the first 300 s only
    out = run_script("experiments.simulate", f"--trace={long_trace}", "--fleet=pair8b", "--workers=1",
                     "--duration_s=100", "--trace_start_s=50", f"--output_dir={tmp_path / 'win'}")
    assert "replaying the window [50 s, 150): 10 of 40 requests (30 left out" in out
    with open(tmp_path / "win" / "summary.json") as f:
        assert json.load(f)["overall"]["requests"] == 10


def test_simulate_names_a_bad_trace_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,5\n")
    text = run_script("experiments.simulate", f"--trace={bad}", f"--output_dir={tmp_path / 'o'}", ok=False)
    assert f"--trace: {bad}:2: expected 3 fields" in text and "Traceback" not in text


# -- the library equivalents ------------------------------------------------------------------

@pytest.mark.parametrize("kw,name", [
    (dict(duration_s=NAN), "duration_s"), (dict(duration_s=INF), "duration_s"),
    (dict(duration_s=-1.0), "duration_s"), (dict(duration_s="10"), "duration_s"),
    (dict(num_requests=-1), "num_requests"), (dict(num_requests=2.5), "num_requests"),
    (dict(num_requests=True), "num_requests"),
    (dict(duration_s=10.0, start_s=NAN), "start_s"),
    (dict(duration_s=10.0, request_limit=-1), "request_limit"),
])
def test_generate_workload_names_the_bad_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        generate_workload({"a": 1.0}, **kw)


def test_generate_workload_refuses_huge_workloads_before_allocating():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"about 3e\+11 requests .*duration_s=300.*request_limit"):
        generate_workload({"a": 1e9}, duration_s=300.0)  # was a 71 GiB MemoryError
    with pytest.raises(ValueError, match="request_limit"):
        generate_workload({"a": 1.0}, num_requests=10**12)
    with pytest.raises(ValueError, match="request_limit"):
        generate_workload({"a": 1.0}, duration_s=100.0, request_limit=50)
    assert time.perf_counter() - t0 < 1.0
    assert len(generate_workload({"a": 1.0}, num_requests=50, request_limit=50)) == 50


def test_replay_trace_names_the_bad_argument(long_trace):
    tr = load_azure_trace(long_trace)
    assert len(replay_trace(tr, ["m"])) == 40
    for kw, name in [(dict(duration_s=NAN), "duration_s"), (dict(duration_s=-1.0), "duration_s"),
                     (dict(start_s=NAN), "start_s"), (dict(max_requests=2.5), "max_requests"),
                     (dict(max_requests=-1), "max_requests"), (dict(time_scale="2"), "time_scale"),
                     (dict(time_scale=NAN), "time_scale"), (dict(target_rate=0.0), "target_rate"),
                     (dict(offset_s=INF), "offset_s"), (dict(max_prompt_len=0), "max_prompt_len"),
                     (dict(max_output_len=-3), "max_output_len")]:
        with pytest.raises(ValueError, match=name):
            replay_trace(tr, ["m"], **kw)
    with pytest.raises(ValueError, match="duration_s"):
        tr.window(0.0, NAN)  # NaN used to select the whole trace silently

"""The main job end to end (subprocess, small flags): the summary.json contract, and serving
one device of a placement plan file."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "experiments.serve", f"--output_dir={tmp_path}",
                           "--num_requests=40", "--max_model_len=128", "--prompt_mean=16",
                           "--output_mean=8", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((tmp_path / "summary.json").read_text())


def _check_schema(s, names):
    assert set(s["models"]) == set(names)
    for m in s["models"].values():
        for key in ("preset", "requests", "finished", "dropped", "failed", "ttft_s", "tpot_s",
                    "slo_attainment", "output_tokens_per_s"):
            assert key in m
        assert set(m["ttft_s"]) >= {"p50", "p90", "p99"}
        assert m["requests"] == m["finished"] + m["dropped"] + m["failed"]
    for key in ("requests", "finished", "dropped", "failed", "slo_attainment",
                "output_tokens_per_s", "duration_s"):
        assert key in s["overall"]
    assert set(s["kv"]) >= {"arena_bytes", "slab_bytes", "peak_used_bytes", "waste_fraction"}
    assert s["compile"]["steady_state_compiles"] == 0 and s["compile"]["warmup_compiles"] > 0


@pytest.mark.slow  # ~60 s; the plan path also runs in tests/test_node.py (--plan --node)
def test_serve_plan_device(tmp_path):
    """A plan file (as experiments.placement writes it) names the device's models, presets,
    rates and SLOs; the main job serves them."""
    plan = {"version": 1, "policy": "fineserve", "max_model_len": 128, "tokens_per_block": 4,
            "cluster": {"nodes": 1, "gpus_per_node": 1, "gpu_memory_bytes": 1 << 30,
                        "memory_utilization": 0.9, "gpu": "cpu"},
            "devices": [{"id": 0, "gpus": [0], "kv_arena_bytes": 1 << 18, "models": [
                {"name": "chat", "config": "tiny-llama", "preset": "org", "rate": 30.0,
                 "slo_ttft_s": 0.5, "weight_bytes": 1 << 20, "min_kv_bytes": 1 << 16},
                {"name": "code", "config": "tiny-qwen2", "preset": "int8_kv8", "rate": 10.0,
                 "slo_ttft_s": 0.5, "weight_bytes": 1 << 20, "min_kv_bytes": 1 << 16}]}]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    out = tmp_path / "out"
    proc, s = _run([f"--plan={path}", "--device_id=0"], out)
    _check_schema(s, ["chat", "code"])
    assert s["config"]["slo_ttft_s"] == {"chat": 0.5, "code": 0.5}
    assert s["models"]["code"]["preset"] == "int8_kv8"
    assert s["kv"]["arena_bytes"] <= 1 << 18
    assert (out / "latency.png").exists()

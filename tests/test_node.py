"""A whole node of a plan from one command: `experiments.serve --plan=PLAN --node=K` with a
tp2 group and two single-device groups (4 CPU virtual devices stand in for the GPUs; XLA_FLAGS
is set in the subprocess's environment before JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_plan(devices, *, nodes=1, gpus_per_node=4, max_model_len=128, tokens_per_block=4,
              slo_ttft_s=2.0):
    """A placement-plan document over tiny models. devices: [(gpus, arena bytes (the whole
    group's), [(name, config, preset, rate), ...]), ...]; footprints from the code's own
    accounting, so `check_plan` accepts it."""
    from fineserve_jax.scheduler.footprint import footprint

    def model(name, config, preset, rate):
        fp = footprint(config, preset, tokens_per_block)
        return {"name": name, "config": config, "preset": preset, "rate": rate,
                "slo_ttft_s": slo_ttft_s, "weight_bytes": fp.weight_bytes,
                "min_kv_bytes": fp.min_kv_bytes(max_model_len)}

    return {"version": 1, "policy": "manual", "max_model_len": max_model_len,
            "tokens_per_block": tokens_per_block,
            "cluster": {"nodes": nodes, "gpus_per_node": gpus_per_node,
                        "gpu_memory_bytes": 1 << 30, "memory_utilization": 0.9, "gpu": "cpu"},
            "devices": [{"id": i, "gpus": list(g), "kv_arena_bytes": arena,
                         "models": [model(*m) for m in ms]}
                        for i, (g, arena, ms) in enumerate(devices)]}


def run_serve(module, args, tmp_path, devices, timeout=900):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", module, f"--output_dir={tmp_path}", "--max_model_len=128",
         "--prompt_mean=12", "--output_mean=8", "--decode_buckets=4,8", "--prefill_buckets=32",
         "--compilation_cache_dir=", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, json.loads((tmp_path / "summary.json").read_text())


NODE_DEVICES = [
    ((0, 1), 1 << 18, [("chat", "tiny-llama", "org", 10.0)]),          # tp2
    ((2,), 1 << 17, [("code", "tiny-mistral", "fp8_kv8", 8.0)]),        # tp1, a replica
    ((3,), 1 << 17, [("code", "tiny-mistral", "fp8_kv8", 8.0),          # tp1, the other replica
                     ("small", "tiny-qwen2", "int8_kv8", 6.0)]),
]


@pytest.fixture(scope="module")
def node_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("node")
    plan = tmp / "plan.json"
    plan.write_text(json.dumps(tiny_plan(NODE_DEVICES)))
    out = tmp / "out"
    proc, s = run_serve("experiments.serve", [f"--plan={plan}", "--node=0", "--num_requests=48"],
                        out, devices=4)
    return proc, s, out


def test_node_plan_served_from_one_command(node_run):
    proc, s, out = node_run
    assert set(s) >= {"models", "overall", "kv", "prefix_cache", "compile", "config", "devices",
                      "node"}
    assert set(s["models"]) == {"chat", "code", "small"}
    assert s["overall"]["requests"] == 48 == sum(m["requests"] for m in s["models"].values())
    for name, m in s["models"].items():  # conservation per model
        assert m["requests"] == m["finished"] + m["dropped"] + m["failed"] > 0, (name, m)
        assert m["failed"] == 0, (name, m)
    assert s["compile"]["steady_state_compiles"] == 0 and s["compile"]["warmup_compiles"] > 0
    assert (out / "latency.png").exists()
    assert "overlap" in proc.stdout


def test_node_device_sections(node_run):
    _, s, _ = node_run
    devs = {d["device"]: d for d in s["devices"]}
    assert [devs[i]["tp"] for i in (0, 1, 2)] == [2, 1, 1]
    assert devs[0]["jax_devices"] == ["cpu:0", "cpu:1"] and devs[2]["jax_devices"] == ["cpu:3"]
    chat = devs[0]["models"]["chat"]
    # tp2 splits tiny-llama's 2 KV heads: each GPU holds half of every block.
    assert chat["kv_heads_per_gpu"] == 1 and chat["kv_replication"] == 1
    assert chat["block_bytes_all_gpus"] == 2 * chat["block_bytes_per_gpu"]
    assert chat["param_bytes_per_gpu"] < chat["param_bytes"]
    assert devs[0]["kv"]["arena_bytes_all_gpus"] == 2 * devs[0]["kv"]["arena_bytes_per_gpu"]
    assert devs[0]["kv"]["arena_bytes_per_gpu"] <= (1 << 18) // 2
    # The replicated model is served by both of its devices (routed least-loaded first).
    assert devs[1]["requests"] > 0 and devs[2]["requests"] > devs[1]["requests"] // 4
    assert sum(d["requests"] for d in s["devices"]) == 48
    assert s["kv"]["arena_bytes"] == sum(d["kv"]["arena_bytes_all_gpus"] for d in s["devices"])
    assert all(d["error"] is None for d in s["devices"])


def test_node_flag_errors(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(tiny_plan(NODE_DEVICES)))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "experiments.serve", f"--plan={plan}",
                           "--node=3", f"--output_dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "node 3 holds no device of the plan" in proc.stderr
    env.pop("XLA_FLAGS", None)  # one CPU device for a node of 4 GPUs
    proc = subprocess.run([sys.executable, "-m", "experiments.serve", f"--plan={plan}",
                           "--node=0", f"--output_dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "xla_force_host_platform_device_count=4" in proc.stderr

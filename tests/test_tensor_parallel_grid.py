"""The full grid (slow): every family x the presets org, fp8_kv8, awq, qoq (as served: AWQ
calibrated and folded) x tp 2 and 4 against tp 1 (greedy tokens identical, float32 logits
within 1e-5 relative, per-device KV bytes, per-layer collectives), in one subprocess with 4
CPU virtual devices; the engine at tp 1, 2 and 4; and the sharded engine steps with Pallas
kernels lower for CUDA on a CPU machine (one kernel call per step, inside the shard_map)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_tensor_parallel import ROOT, check_engine_runs, check_parity_case, run_worker

FAMILIES = ("tiny-llama", "tiny-mistral", "tiny-qwen2")
PRESETS = ("org", "fp8_kv8", "awq", "qoq")
GRID = [f"{f}:{p}:{tp}" for f in FAMILIES for p in PRESETS for tp in (2, 4)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    # The presets as served: AWQ presets calibrated, their scales folded.
    return run_worker("parity_calibrated", tmp_path_factory.mktemp("grid"), *GRID, timeout=3000)


@pytest.mark.slow
@pytest.mark.parametrize("case", GRID)
def test_grid_case_matches_tp1(grid, case):
    c = grid["cases"][case]
    check_parity_case(c)
    quantized_acts = case.split(":")[1] in ("fp8_kv8", "qoq")
    assert c["collectives"]["per_layer"] == {"all-reduce": 4 if quantized_acts else 2}, c


@pytest.mark.slow
def test_llm_tp2_and_tp4_match_tp1_with_no_recompiles(tmp_path):
    check_engine_runs(run_worker("engine", tmp_path, "1", "2", "4")["runs"], (1, 2, 4))


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_steps_lower_for_cuda(tmp_path, tp):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "lower.json"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), str(tp)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    for kind, n in r["triton_calls"].items():
        assert n == 1, (kind, r)  # the layer body's one attention kernel, once
    for kind, mark in r["shardings"].items():  # the kernel sits in a manual (shard_map) region
        assert mark == "sdy.manual_computation", (kind, mark)


def _lower_worker(out, tp):
    import jax

    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.engine import sharding as S
    from fineserve_jax.engine.model_runner import ModelRunner
    from fineserve_jax.loader import load_model

    model = load_model("tiny-llama", quant="fp8_kv8", dtype="bfloat16")
    group = S.device_group(list(range(tp)))
    split = S.kv_split(model.config.num_heads, model.config.num_kv_heads, tp)
    fmt = S.local_kv_format(model.kv_format(16), split)
    runner = ModelRunner("m", model, fmt, Buckets(decode_sizes=(8,), prefill_sizes=(64,),
                                                  prefill_seqs=2, table_width=4),
                         "pallas_triton", interpret=False, group=group)
    arena = jax.ShapeDtypeStruct((tp * 4, 8 * fmt.block_words), jax.numpy.uint32,
                                 sharding=group.arena_sharding)
    calls, marks = {}, {}
    for kind, size in (("decode", 8), ("prefill", 64)):
        text = runner._jit[kind].trace(runner.params, arena, runner.inputs_for(kind, size)) \
            .lower(lowering_platforms=("cuda",)).as_text()
        calls[kind] = text.count("xla.gpu.triton")
        marks[kind] = "sdy.manual_computation" if "sdy.manual_computation" in text else text[:200]
    with open(out, "w") as f:
        json.dump({"triton_calls": calls, "shardings": marks}, f)


if __name__ == "__main__":
    _lower_worker(sys.argv[1], int(sys.argv[2]))

"""The benchmarks run end to end on tiny shapes (CPU: kernels in interpret mode)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernel_bench_quick_smoke(tmp_path):
    cmd = [sys.executable, "-m", "experiments.kernel_bench", "--quick", "--batches=2",
           "--contexts=20", "--kv_dtypes=int8", f"--output_dir={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert report["meta"]["copy_bandwidth_GBps"] > 0
    [row] = report["results"]
    assert row["kv_dtype"] == "int8" and row["batch"] == 2 and row["context"] == 20
    for impl in ("pallas_triton", "xla", "reference"):
        assert row[impl]["time_us"] > 0 and 0 < row[impl]["frac_copy_bw"]
    assert row["xla"]["resolved_impl"] == "xla"
    assert row["ref_over_kernel"] > 0 and row["xla_over_kernel"] > 0
    assert "ref/kernel" in proc.stdout and "xla/kernel" in proc.stdout


def test_tpot_roofline_quick_smoke(tmp_path):
    cmd = [sys.executable, "-m", "experiments.tpot_roofline", "--quick", f"--output_dir={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "tpot_roofline.json").read_text())
    assert r["batch"] == 4 and r["step_s"] > 0 and r["roofline_s"] > 0
    assert r["ratio_to_roofline"] == r["step_s"] / r["roofline_s"]
    assert "roofline" in proc.stdout


@pytest.mark.slow
def test_xla_path_bench_quick_smoke(tmp_path):
    cmd = [sys.executable, "-m", "experiments.xla_path_bench", "--quick", "--impls=xla",
           "--noablations", f"--output_dir={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "xla_path.json").read_text())
    [row] = r["steps"]
    assert row["resolved_impl"] == "xla" and row["decode_step_s"] > 0 and row["prefill_step_s"] > 0
    assert [d["layers"] for d in r["depth"]] == [1, 2]
    assert all(d["decode"]["compile_s"] > 0 for d in r["depth"])
    assert "layers:" in proc.stdout

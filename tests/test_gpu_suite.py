"""experiments.gpu_suite runs end to end on a CPU (--dry_run), and one part's failure or hang
never loses the others."""

import json
import os
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["kernel_tests", "engine_parity", "kernel_bench", "tpot_roofline", "profile"]


def _suite(*flags, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "experiments.gpu_suite", *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_runs_every_part(tmp_path):
    bundle = tmp_path / "bundle.tar.gz"
    proc = _suite("--dry_run", f"--output_dir={tmp_path / 'out'}", f"--bundle_to={bundle}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = {r["part"]: r for r in summary["parts"]}
    assert list(rows) == PARTS
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["kernel_tests"]["tests"]["passed"] > 0
    assert rows["engine_parity"]["tests"]["passed"] > 0
    bench = rows["kernel_bench"]["rows"][0]
    assert all(bench[i]["us"] > 0 for i in ("pallas_triton", "xla", "reference"))
    assert rows["tpot_roofline"]["ratio_to_roofline"] > 0
    assert rows["profile"]["csv_rows"] > 0
    assert "kernel_bench" in (tmp_path / "out" / "summary.txt").read_text()
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert "gpu_suite/summary.json" in names and "gpu_suite/kernel_tests.log" in names


def test_a_failing_and_a_hanging_part_do_not_stop_the_others(tmp_path):
    t0 = time.perf_counter()
    proc = _suite(f"--output_dir={tmp_path}", "--only=kernel_bench,tpot_roofline,profile",
                  "--inject_failure=kernel_bench,profile", "--inject_hang=tpot_roofline",
                  "--part_timeout_s=3", timeout=120)
    assert proc.returncode == 1
    rows = {r["part"]: r for r in json.loads((tmp_path / "summary.json").read_text())["parts"]}
    assert rows["kernel_bench"]["status"] == "failed" and rows["kernel_bench"]["rc"] == 3
    assert rows["tpot_roofline"]["status"] == "timeout"
    assert rows["profile"]["status"] == "failed"  # still ran after the hang was killed
    assert time.perf_counter() - t0 < 60
    assert "injected hang" in (tmp_path / "tpot_roofline.log").read_text()

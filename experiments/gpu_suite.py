"""Everything that needs a GPU, in one call: correctness of the compiled kernels, engine
parity under them, and the benchmarks, each part a subprocess with its own time budget.

    # On a lent H200 (JAX 0.11, CUDA 13), from the checkout, in one device call (<= 8 min):
    PYTHONPATH=. python -m experiments.gpu_suite --output_dir=/tmp/gpu_suite \\
        --bundle_to=$OUT/gpu_suite.tar.gz && cp /tmp/gpu_suite/summary.* $OUT/
    # Anywhere (CPU): tiny shapes, interpret mode, well under a minute (a default-suite test):
    python -m experiments.gpu_suite --dry_run --output_dir=/tmp/gpu_suite_dry

Parts, in order (a failure or a hang of one never loses the others: each runs in its own
process group, is killed at its budget, and its log is kept):
  kernel_tests     pytest of the decode/prefill kernels (compiled on a GPU, interpreted on a
                   CPU), the arena and the lowering tests
  engine_parity    the engine's greedy parity tests with attention "auto" (pallas_triton on
                   a GPU) and the pallas_triton-vs-reference token test
  kernel_bench     decode attention, Llama-8B heads, batch 64, context 4096, bf16/fp8/int8/int4:
                   Pallas kernel vs the XLA path vs the reference, against the measured copy
                   bandwidth (experiments/kernel_bench.py)
  tpot_roofline    the engine's decode step of a Llama-3.1-8B shape vs its memory roofline
  tpot_roofline_dsf  the same with XLA's dynamic-slice fusion on, which lets the matmuls of the
                   scanned layer body read each layer's slice of the stacked weights in place
                   instead of copying it (compare the two step times)
  profile          experiments.profile: engine step times for the simulator's cost model
Output folder: one log per part (`<part>.log`), each part's own results under `<part>/`, and
`summary.json` + `summary.txt` (a table: status, seconds, key figures). The device machine
returns at most 8 files from $OUT, hence `--bundle_to` (one .tar.gz of the whole folder).
Exit status: 0 when every part that ran passed, 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from typing import Dict, List, Optional

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_OUT = flags.DEFINE_string("output_dir", "runs/gpu_suite", "folder for logs, results, summary")
_DRY = flags.DEFINE_boolean("dry_run", False, "tiny shapes and test subsets (CPU, interpret "
                            "mode): proves the suite runs, measures nothing")
_BUDGET = flags.DEFINE_float("budget_s", 465.0, "wall-clock budget of the whole suite; a part "
                             "gets its budget plus what earlier parts left unused")
_ONLY = flags.DEFINE_list("only", None, "run only these parts (default: all, in order)")
_BUNDLE = flags.DEFINE_string("bundle_to", None, "also write the output folder as this .tar.gz")
_PART_TIMEOUT = flags.DEFINE_float("part_timeout_s", None, "override every part's budget")
_INJECT_FAIL = flags.DEFINE_list("inject_failure", [], "parts replaced by a failing command "
                                 "(tests of the suite itself)")
_INJECT_HANG = flags.DEFINE_list("inject_hang", [], "parts replaced by a command that hangs "
                                 "(tests of the suite itself)")


@dataclasses.dataclass
class Part:
    """One subprocess of the suite. `args` run with this Python; `results` is a JSON file
    (relative to the part's folder) whose key figures go into the summary."""

    name: str
    args: List[str]
    budget_s: float
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    results: Optional[str] = None


def _pytest(files: List[str], select: Optional[str], junit: str, marks: Optional[str] = None):
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
    if select:
        args += ["-k", select]
    if marks is not None:
        args += ["-m", marks]
    return args


def parts(out: str, dry: bool) -> List[Part]:
    d = lambda name: os.path.join(out, name)  # noqa: E731
    kernel_files = ["tests/test_kernels_decode.py", "tests/test_kernels_prefill.py",
                    "tests/test_arena.py", "tests/test_kernels_lowering.py"]
    engine_files = ["tests/test_engine.py"]
    if dry:
        return [
            Part("kernel_tests", _pytest(kernel_files[:1], "bf16-mha", d("kernel_tests.xml")),
                 60),
            Part("engine_parity", _pytest(engine_files, "pallas_triton_greedy and org",
                                          d("engine_parity.xml")), 90),
            Part("kernel_bench", ["-m", "experiments.kernel_bench", "--quick", "--batches=2",
                                  "--contexts=20", "--kv_dtypes=int8", "--reps=1", "--warmup=0",
                                  f"--output_dir={d('kernel_bench')}"], 60,
                 results="kernel_bench/kernel_bench.json"),
            Part("tpot_roofline", ["-m", "experiments.tpot_roofline", "--quick",
                                   f"--output_dir={d('tpot_roofline')}"], 60,
                 results="tpot_roofline/tpot_roofline.json"),
            Part("profile", ["-m", "experiments.profile", "--models=tiny-llama:org",
                             "--batch_sizes=1", "--input_lens=16", "--output_len=3", "--reps=1",
                             "--wakeup_idle_s=0", f"--output={d('profile/profile.csv')}"], 60,
                 results="profile/profile.csv"),
        ]
    tpot = ["-m", "experiments.tpot_roofline", "--model=llama-3.1-8b", "--batch=32",
            "--context=1024", "--reps=20"]
    return [
        # Default (non-slow) kernel tests compiled; the slow full products are left to a
        # separate call (`pytest -m slow ...`): they compile ~100 kernel variants.
        Part("kernel_tests", _pytest(kernel_files, None, d("kernel_tests.xml")), 110),
        Part("engine_parity", _pytest(engine_files, "greedy or pallas", d("engine_parity.xml")),
             80),
        Part("kernel_bench", ["-m", "experiments.kernel_bench", "--models=llama8b",
                              "--batches=64", "--contexts=4096",
                              "--kv_dtypes=bf16,fp8,int8,int4",
                              f"--output_dir={d('kernel_bench')}"], 90,
             results="kernel_bench/kernel_bench.json"),
        Part("tpot_roofline", tpot + [f"--output_dir={d('tpot_roofline')}"], 75,
             results="tpot_roofline/tpot_roofline.json"),
        Part("tpot_roofline_dsf", tpot + [f"--output_dir={d('tpot_roofline_dsf')}"], 60,
             env={"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                " --xla_gpu_enable_dynamic_slice_fusion=true").strip()},
             results="tpot_roofline_dsf/tpot_roofline.json"),
        Part("profile", ["-m", "experiments.profile", f"--output={d('profile/gpu-tiny.csv')}"],
             45, results="profile/gpu-tiny.csv"),
    ]


def _injected(part: Part) -> Part:
    if part.name in _INJECT_FAIL.value:
        return dataclasses.replace(part, args=["-c", "import sys; print('injected failure'); "
                                               "sys.exit(3)"], results=None)
    if part.name in _INJECT_HANG.value:
        return dataclasses.replace(part, args=["-c", "import time; print('injected hang', "
                                               "flush=True); time.sleep(3600)"], results=None)
    return part


def run_part(part: Part, out: str, timeout_s: float) -> dict:
    """Run one part in its own process group; kill the group at the timeout."""
    log_path = os.path.join(out, f"{part.name}.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **part.env)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, *part.args]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n# timeout {timeout_s:.0f} s, extra env {part.env}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group only
            rc = proc.wait()
            status = "timeout"
    row = {"part": part.name, "status": status, "rc": rc,
           "seconds": round(time.perf_counter() - t0, 1), "timeout_s": round(timeout_s, 1),
           "log": os.path.basename(log_path)}
    row.update(_figures(part, out, log_path))
    return row


def _tail(path: str, n: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _figures(part: Part, out: str, log_path: str) -> dict:
    """Key figures of a part: pytest counts, or numbers from its results JSON."""
    fig: dict = {}
    m = re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", _tail(log_path))
    if m:
        fig["tests"] = {k: int(v) for v, k in m}
    path = os.path.join(out, part.results) if part.results else None
    if path and os.path.isfile(path):
        if path.endswith(".csv"):
            with open(path) as f:
                fig["csv_rows"] = max(0, sum(1 for line in f if line.strip()) - 1)
        else:
            with open(path) as f:
                fig.update(_result_figures(part.name, json.load(f)))
    return fig


def _result_figures(name: str, res: dict) -> dict:
    if name.startswith("kernel_bench"):
        rows = []
        for r in res.get("results", []):
            row = {k: r.get(k) for k in ("kv_dtype", "batch", "context")}
            for impl in ("pallas_triton", "xla", "reference"):
                cell = r.get(impl, {})
                if "time_us" in cell:
                    row[impl] = {"us": round(cell["time_us"], 1),
                                 "frac_copy_bw": round(cell["frac_copy_bw"], 3)}
                elif cell:
                    row[impl] = cell.get("skipped") or cell.get("error", "?")[:80]
            rows.append(row)
        return {"copy_bandwidth_GBps": round(res["meta"]["copy_bandwidth_GBps"], 1),
                "rows": rows}
    if name.startswith("tpot_roofline"):
        return {k: res[k] for k in ("model", "layers", "batch", "context", "attention_impl",
                                    "step_s", "roofline_s", "ratio_to_roofline",
                                    "copy_bandwidth_GBps") if k in res}
    return {}


def _environment() -> dict:
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "python": sys.version.split()[0], "argv": sys.argv}
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.__version__); print(jax.devices())"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    env["jax"] = probe.stdout.strip() or probe.stderr.strip()[-500:]
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                              "clocks.sm,clocks.mem", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        env["nvidia_smi"] = smi.stdout.strip()
    return env


def _short(row: dict) -> str:
    """The figures of a summary row on one line."""
    bits = []
    if "tests" in row:
        bits.append(" ".join(f"{v} {k}" for k, v in row["tests"].items()))
    if "csv_rows" in row:
        bits.append(f"{row['csv_rows']} profile rows")
    if "ratio_to_roofline" in row:
        bits.append(f"step {row['step_s'] * 1e3:.2f} ms = {row['ratio_to_roofline']:.2f}x "
                    f"roofline ({row.get('attention_impl')})")
    if "rows" in row:
        bits.append(f"copy {row['copy_bandwidth_GBps']} GB/s")
        for r in row["rows"]:
            cells = [f"{impl} {c['us']}us/{100 * c['frac_copy_bw']:.0f}%" if isinstance(c, dict)
                     else f"{impl} {c}" for impl, c in r.items()
                     if impl in ("pallas_triton", "xla", "reference")]
            bits.append(f"[{r['kv_dtype']} B{r['batch']} ctx{r['context']}: {', '.join(cells)}]")
    return "; ".join(bits)


def summarize(rows: List[dict], env: dict, out: str) -> str:
    lines = [f"gpu_suite {env['date']}  jax {env['jax'].splitlines()[0] if env['jax'] else '?'}"
             + (f"  gpu {env['nvidia_smi']}" if env.get("nvidia_smi") else ""),
             f"{'part':18s} {'status':8s} {'seconds':>8s}  figures"]
    for r in rows:
        lines.append(f"{r['part']:18s} {r['status']:8s} {r['seconds']:8.1f}  {_short(r)}")
    table = "\n".join(lines)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"environment": env, "parts": rows}, f, indent=1)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv):
    del argv
    out = os.path.abspath(_OUT.value)
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    env = _environment()
    todo = parts(out, _DRY.value)
    known = [p.name for p in todo]
    if _ONLY.value:
        unknown = sorted(set(_ONLY.value) - set(known))
        if unknown:
            raise app.UsageError(f"unknown --only parts {unknown}; valid: {known}")
        todo = [p for p in todo if p.name in _ONLY.value]
    rows = []
    budgets = [_PART_TIMEOUT.value or p.budget_s for p in todo]
    for i, part in enumerate(todo):
        part = _injected(part)
        left = _BUDGET.value - (time.perf_counter() - t_start)
        # A part may use its own budget plus what earlier parts left unused, never the time
        # reserved for the parts after it.
        timeout = min(left, max(budgets[i], left - sum(budgets[i + 1:])))
        if _PART_TIMEOUT.value:
            timeout = min(timeout, _PART_TIMEOUT.value)
        if left < 5:
            rows.append({"part": part.name, "status": "skipped", "rc": None, "seconds": 0.0,
                         "reason": "suite budget spent"})
            continue
        print(f"[gpu_suite] {part.name}: up to {timeout:.0f} s", flush=True)
        rows.append(run_part(part, out, timeout))
        print(f"[gpu_suite] {part.name}: {rows[-1]['status']} in {rows[-1]['seconds']} s",
              flush=True)
    table = summarize(rows, env, out)
    print(table)
    for r in rows:  # the end of each failing part's log, so the device reply shows why
        if r["status"] in ("failed", "timeout"):
            print(f"--- {r['part']} ({r['status']}), end of {r['log']}:")
            print(_tail(os.path.join(out, r["log"]), 1500))
    if _BUNDLE.value:
        os.makedirs(os.path.dirname(os.path.abspath(_BUNDLE.value)), exist_ok=True)
        with tarfile.open(_BUNDLE.value, "w:gz") as tar:
            tar.add(out, arcname="gpu_suite")
        print(f"bundle: {_BUNDLE.value}")
    sys.exit(0 if all(r["status"] == "ok" for r in rows) else 1)


if __name__ == "__main__":
    app.run(main)

"""Workload generation, length distributions, trace replay and rate files (no JAX)."""

import ast
import math
import time
from pathlib import Path

import numpy as np
import pytest

from fineserve_jax import workload as wl
from fineserve_jax.workload import (
    LengthDist,
    ModelLoad,
    TraceError,
    arrival_times,
    empirical_cv,
    generate_workload,
    load_azure_trace,
    load_rates_yaml,
    power_law_rates,
    power_law_weights,
    replay_trace,
)

WORKLOAD_DIR = Path(wl.__file__).parent


def _shared(subdir, name):
    try:
        return wl.data_file(subdir, name)
    except FileNotFoundError:
        pytest.skip(f"shared data {subdir}/{name} not available")


def _within_poisson_count(n, expected, sigmas=4.0):
    return abs(n - expected) <= sigmas * math.sqrt(expected)


def test_no_jax_imports():
    for f in WORKLOAD_DIR.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "jax" or n.startswith(("jax.", "flax")) for n in names), (f, names)


# ---------------------------------------------------------------- rates and arrivals


def test_power_law_weights_and_rates_exact():
    np.testing.assert_allclose(power_law_weights(4, 1.0), [1, 1 / 2, 1 / 3, 1 / 4])
    np.testing.assert_allclose(power_law_weights(3, 0.0), [1, 1, 1])
    r = power_law_rates(["a", "b", "c", "d"], 1.0, top_rate=12.0)
    assert r == pytest.approx({"a": 12.0, "b": 6.0, "c": 4.0, "d": 3.0})
    r = power_law_rates(4, 2.0, total_rate=10.0)
    assert sum(r) == pytest.approx(10.0)
    assert r[0] / r[1] == pytest.approx(4.0) and r[0] / r[3] == pytest.approx(16.0)
    with pytest.raises(ValueError):
        power_law_rates(3, 1.0)  # neither top nor total
    with pytest.raises(ValueError):
        power_law_rates(["a", "a"], 1.0, top_rate=1.0)
    with pytest.raises(ValueError):
        power_law_weights(3, -1.0)


def test_poisson_rate_and_cv_long_run():
    rng = np.random.default_rng(1)
    rate, dur = 40.0, 2500.0
    t = arrival_times(rng, rate, duration_s=dur)
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < dur
    assert _within_poisson_count(len(t), rate * dur)
    assert empirical_cv(t) == pytest.approx(1.0, abs=0.02)
    # Mutation: the same check rejects a stream 5% too fast.
    t_fast = arrival_times(np.random.default_rng(1), rate * 1.05, duration_s=dur)
    assert not _within_poisson_count(len(t_fast), rate * dur)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_cv(cv):
    rng = np.random.default_rng(7)
    t = arrival_times(rng, 20.0, num=100_000, process="gamma", cv=cv)
    assert empirical_cv(t) == pytest.approx(cv, rel=0.05)
    assert 100_000 / t[-1] == pytest.approx(20.0, rel=0.03)
    # Mutation: a Poisson stream fails the same CV check.
    p = arrival_times(np.random.default_rng(7), 20.0, num=100_000)
    assert empirical_cv(p) != pytest.approx(cv, rel=0.05)


def test_arrival_argument_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="exactly one"):
        arrival_times(rng, 1.0)
    with pytest.raises(ValueError, match="unknown arrival"):
        arrival_times(rng, 1.0, num=3, process="weibull")
    with pytest.raises(ValueError, match="cv"):
        arrival_times(rng, 1.0, num=3, process="gamma", cv=0.0)
    assert arrival_times(rng, 0.0, duration_s=10).size == 0


# ---------------------------------------------------------------- lengths


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert set(LengthDist.fixed(7).sample(rng, 10)) == {7}
    u = LengthDist.uniform(3, 5).sample(rng, 5000)
    assert set(u) == {3, 4, 5}
    ln = LengthDist.lognormal(161, 1.0, 1, 2048)
    assert ln.mean() == pytest.approx(161.0, rel=1e-6)
    x = ln.sample(rng, 200_000)
    assert x.min() >= 1 and x.max() <= 2048 and x.dtype == np.int64
    assert x.mean() == pytest.approx(161.0, rel=0.02)
    # Clipping matters: the unclipped mu would overshoot the clipped mean.
    tight = LengthDist.lognormal(100, 1.5, 10, 300)
    y = tight.sample(rng, 100_000)
    assert y.min() >= 10 and y.max() <= 300
    assert y.mean() == pytest.approx(100.0, rel=0.02)
    e = LengthDist.empirical([1, 2, 1000], hi=500).sample(rng, 1000)
    assert set(e) <= {1, 2, 500}
    with pytest.raises(ValueError):
        LengthDist.fixed(0)
    with pytest.raises(ValueError):
        LengthDist.uniform(5, 3)
    with pytest.raises(ValueError):
        LengthDist.lognormal(5000, 1.0, 1, 2048)


def test_length_presets():
    sg, lm = wl.sharegpt(), wl.lmsys()
    assert (sg.prompt.mean(), sg.output.mean()) == pytest.approx((161, 338), rel=1e-6)
    assert (lm.prompt.mean(), lm.output.mean()) == pytest.approx((100, 261), rel=1e-6)
    f = wl.as_lengths("fixed:12,34")
    assert (f.prompt.value, f.output.value) == (12, 34)
    assert wl.as_lengths((5, 6)).output.value == 6
    with pytest.raises(ValueError, match="unknown length preset"):
        wl.as_lengths("alpaca")


# ---------------------------------------------------------------- generator


def test_generate_workload_deterministic_sorted_and_rates():
    models = {"a": 6.0, "b": 2.0}
    w1 = generate_workload(models, duration_s=2000, seed=3, lengths="lmsys", slo_ttft_s=0.5)
    w2 = generate_workload(models, duration_s=2000, seed=3, lengths="lmsys", slo_ttft_s=0.5)
    assert w1 == w2
    assert [r.request_id for r in w1] == list(range(len(w1)))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(w1, w1[1:]))
    na = sum(r.model == "a" for r in w1)
    nb = len(w1) - na
    assert _within_poisson_count(na, 12000) and _within_poisson_count(nb, 4000)
    assert all(r.slo_ttft_s == 0.5 for r in w1)
    assert np.mean([r.prompt_len for r in w1]) == pytest.approx(100, rel=0.05)
    w3 = generate_workload(models, duration_s=2000, seed=4, lengths="lmsys")
    assert [r.arrival_s for r in w3[:10]] != [r.arrival_s for r in w1[:10]]


def test_generate_num_requests_is_prefix_and_lengths_do_not_move_arrivals():
    loads = [ModelLoad("x", 3.0, slo_ttft_s=1.0), ModelLoad("y", 1.0, lengths=(10, 20))]
    long = generate_workload(loads, duration_s=200, seed=11, arrival="gamma", cv=2.0)
    n = 150
    assert len(long) > n
    first = generate_workload(loads, num_requests=n, seed=11, arrival="gamma", cv=2.0)
    assert len(first) == n
    assert first == long[:n]
    assert all((r.prompt_len, r.output_len) == (10, 20) for r in first if r.model == "y")
    assert all(r.slo_ttft_s == 1.0 for r in first if r.model == "x")
    other = generate_workload(loads, num_requests=n, seed=11, arrival="gamma", cv=2.0, lengths="fixed:5,5")
    assert [r.arrival_s for r in other] == [r.arrival_s for r in first]


def test_generate_workload_errors():
    with pytest.raises(ValueError, match="exactly one"):
        generate_workload({"a": 1.0})
    with pytest.raises(ValueError, match="duplicate"):
        generate_workload([ModelLoad("a", 1.0), ModelLoad("a", 2.0)], num_requests=1)
    with pytest.raises(ValueError, match="rate"):
        ModelLoad("a", -1.0)
    with pytest.raises(ValueError):
        generate_workload({"a": 0.0}, num_requests=3)
    assert generate_workload({"a": 0.0, "b": 1.0}, duration_s=10, seed=0)[0].model == "b"


# ---------------------------------------------------------------- traces

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
GOOD = (
    HEADER
    + "2023-11-16 18:15:46.6805900,374,44\n"
    + "2023-11-16 18:15:50.9951690,396,109\n"
    + "\n"
    + "2023-11-16 18:15:51.2224670,879,55\n"
)


def _write(tmp_path, text, name="t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_trace_parse_exact(tmp_path):
    tr = load_azure_trace(_write(tmp_path, GOOD))
    assert len(tr) == 3
    np.testing.assert_allclose(tr.times_s, [0.0, 4.314579, 4.541877], atol=1e-9)
    assert tr.prompt_lens.tolist() == [374, 396, 879]
    assert tr.output_lens.tolist() == [44, 109, 55]
    assert tr.line_numbers.tolist() == [2, 3, 5]
    assert tr.first_timestamp == "2023-11-16 18:15:46.6805900"


def test_trace_midnight_unsorted_numeric_and_timezones(tmp_path):
    text = HEADER + "2023-11-17 00:00:00.1,5,5\n2023-11-16 23:59:59.9,1,2\n"
    tr = load_azure_trace(_write(tmp_path, text))
    np.testing.assert_allclose(tr.times_s, [0.0, 0.2], atol=1e-9)
    assert tr.prompt_lens.tolist() == [1, 5] and tr.line_numbers.tolist() == [3, 2]
    tz = HEADER + "2024-05-10 00:00:00+01:00,1,1\n2024-05-09T23:30:00Z,1,1\n"
    np.testing.assert_allclose(load_azure_trace(_write(tmp_path, tz, "tz.csv")).times_s, [0.0, 1800.0])
    num = "GeneratedTokens,TIMESTAMP,ContextTokens,extra\n3,10.5,7,x\n4,12.0,8,y\n"
    trn = load_azure_trace(_write(tmp_path, num, "n.csv"))
    np.testing.assert_allclose(trn.times_s, [0.0, 1.5])
    assert trn.prompt_lens.tolist() == [7, 8] and trn.output_lens.tolist() == [3, 4]


@pytest.mark.parametrize(
    "text, line, pattern",
    [
        ("TIME,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,1,1\n", 1, "bad header"),
        ("2023-11-16 18:15:46.68,1,1\n", 1, "bad header"),
        ("", 1, "empty file"),
        (GOOD + "2023-11-16 18:15:52.1,12x,3\n", 6, "ContextTokens is not a number"),
        (GOOD + "2023-11-16 18:15:52.1,12,3,4\n", 6, "expected 3 fields, got 4"),
        (GOOD + "2023-11-16 18:15:52.1,12\n", 6, "expected 3 fields, got 2"),
        (GOOD + "2023-11-16 18:15:52.1,12,-3\n", 6, "GeneratedTokens is negative"),
        (GOOD + "yesterday,12,3\n", 6, "cannot parse TIMESTAMP"),
        (GOOD + "2023-13-16 18:15:52.1,12,3\n", 6, "bad date"),
        (GOOD + "2023-11-16 25:15:52.1,12,3\n", 6, "bad time of day"),
        (GOOD + "12.5,12,3\n", 6, "mixes numeric"),
        (GOOD + "2023-11-16 18:15:52.1,12.5,3\n", 6, "not a whole number"),
    ],
)
def test_trace_malformed_names_file_and_line(tmp_path, text, line, pattern):
    p = _write(tmp_path, text, "bad.csv")
    with pytest.raises(TraceError, match=pattern) as ei:
        load_azure_trace(p)
    assert ei.value.line == line
    assert str(ei.value).startswith(f"{p}:{line}:")


def test_trace_missing_file(tmp_path):
    with pytest.raises(TraceError, match="cannot open"):
        load_azure_trace(tmp_path / "nope.csv")


def test_replay_window_compression_and_assignment(tmp_path):
    rows = "".join(f"2023-11-16 18:00:{i:02d}.0000000,{100 + i},{i}\n" for i in range(40))
    tr = load_azure_trace(_write(tmp_path, HEADER + rows))
    reqs = replay_trace(tr, ["m"], time_scale=2.0, start_s=10, duration_s=20, max_requests=5)
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert [r.prompt_len for r in reqs] == [110, 111, 112, 113, 114]
    assert [r.request_id for r in reqs] == [0, 1, 2, 3, 4]
    z = replay_trace(tr, ["m"], max_requests=1)
    assert z[0].output_len == 1  # a 0-token output becomes 1
    # target rate: 40 requests at 1/s (span 39 s) -> 4/s
    fast = replay_trace(tr, {"a": 1.0}, target_rate=4.0)
    assert (len(fast) - 1) / fast[-1].arrival_s == pytest.approx(4.0)
    clipped = replay_trace(tr, ["m"], max_prompt_len=105, max_output_len=3)
    assert max(r.prompt_len for r in clipped) == 105 and max(r.output_len for r in clipped) == 3
    loads = [ModelLoad("s", 1.0, slo_ttft_s=0.25), ModelLoad("t", 0.0)]
    assert {(r.model, r.slo_ttft_s) for r in replay_trace(tr, loads)} == {("s", 0.25)}
    with pytest.raises(ValueError, match="at most one"):
        replay_trace(tr, ["m"], time_scale=2, target_rate=3)
    with pytest.raises(ValueError):
        replay_trace(tr, {"a": 0.0})


def test_real_conv_trace_stats_and_replay():
    path = _shared("traces", "azure_llm_conv_2023.csv")
    t0 = time.perf_counter()
    tr = load_azure_trace(path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0
    s = tr.stats()
    assert s["requests"] == 19366
    assert s["mean_rate_rps"] == pytest.approx(5.5, abs=0.1)
    assert s["interarrival_cv"] == pytest.approx(1.1, abs=0.05)
    assert (s["prompt_median"], s["prompt_max"], s["output_median"], s["output_max"]) == (1020, 14050, 129, 1000)
    rates = {"big": 3.0, "small": 1.0}
    reqs = replay_trace(tr, rates, target_rate=20.0, max_requests=8000, seed=5)
    assert len(reqs) == 8000
    frac = sum(r.model == "big" for r in reqs) / len(reqs)
    assert frac == pytest.approx(0.75, abs=4 * math.sqrt(0.75 * 0.25 / 8000))
    assert (len(reqs) - 1) / reqs[-1].arrival_s == pytest.approx(20.0)
    assert replay_trace(tr, rates, target_rate=20.0, max_requests=8000, seed=5) == reqs
    assert replay_trace(tr, rates, target_rate=20.0, max_requests=8000, seed=6) != reqs


# ---------------------------------------------------------------- rate files


@pytest.mark.parametrize("condense, total", [(500, 47.5), (2000, 190.0)])
def test_lmsys_rates(condense, total):
    _shared("rates", f"lmsys_day55_condense{condense}.yaml")
    cfg = wl.lmsys_rates(condense)
    assert (cfg.nnodes, cfg.ngpus_per_node, cfg.num_gpus) == (4, 8, 32)
    assert len(cfg.models) == 16
    assert cfg.total_rate == pytest.approx(total, rel=0.01)
    assert {m.model for m in cfg.models} <= {"llama-7b", "llama-13b", "llama-30b", "llama-65b"}
    assert cfg.models[0].name == "llm-1" and cfg.models[0].model == "llama-13b"
    from models.presets import REAL

    assert all(m.model in REAL for m in cfg.models)
    loads = cfg.as_model_loads(slo_ttft_s=2.0)
    assert sum(m.rate for m in loads) == pytest.approx(cfg.total_rate)


def test_rates_yaml_errors(tmp_path):
    ok = "cluster: {nnodes: 1, ngpus_per_node: 2}\nmodels:\n- {name: a, model: /x/Llama-7B/, rate: 1.5}\n"
    cfg = load_rates_yaml(_write(tmp_path, ok, "ok.yaml"))
    assert cfg.models[0].model == "llama-7b" and cfg.num_gpus == 2
    bad = {
        "nocluster.yaml": "models: []\n",
        "badrate.yaml": ok.replace("1.5", "fast"),
        "negrate.yaml": ok.replace("1.5", "-1"),
        "nomodel.yaml": ok.replace("model: /x/Llama-7B/, ", ""),
        "syntax.yaml": "cluster: {nnodes: 1\n",
    }
    for name, text in bad.items():
        with pytest.raises(wl.RatesFileError, match=name.replace(".", r"\.")):
            load_rates_yaml(_write(tmp_path, text, name))


def test_data_dir_env(tmp_path, monkeypatch):
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "x.csv").write_text(GOOD)
    monkeypatch.setenv("FINESERVE_DATA_DIR", str(tmp_path))
    assert wl.data_file("traces", "x.csv") == tmp_path / "traces" / "x.csv"
    monkeypatch.setenv("FINESERVE_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="FINESERVE_DATA_DIR"):
        wl.data_dir("traces")

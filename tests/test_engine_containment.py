"""Fault containment in a live engine: no request, however malformed, and no failing step
takes the engine down or disturbs other requests; every request ends exactly once."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fineserve_jax import Engine, ModelSpec, Request, SamplingParams
from fineserve_jax.core.buckets import Buckets
from fineserve_jax.core.loop import LoopBroken
from fineserve_jax.scheduler.local import SchedulerConfig

SMALL = Buckets(decode_sizes=(1, 4), prefill_sizes=(16, 64), prefill_seqs=4)
MAXLEN = 64


def make_engine(**kw):
    kw = {"arena_bytes": 256 << 10, "slab_target_bytes": 16 << 10, "max_model_len": MAXLEN,
          "tokens_per_block": 4, "buckets": SMALL, "scheduler": SchedulerConfig(drop=False),
          "profile_reps": 0, **kw}
    return Engine([ModelSpec("a", "tiny-llama", "org"), ModelSpec("b", "tiny-qwen2", "fp8_kv8")], **kw)


@pytest.fixture(scope="module")
def engine():
    return make_engine()


@pytest.fixture(scope="module")
def fault_engine():
    """An engine for fault injection (each test restores what it patched)."""
    return make_engine()


def good_request(model="a", n=3):
    return Request(model, [1, 5, 9, 11], SamplingParams(max_tokens=n, ignore_eos=True))


# -- random hostile requests -------------------------------------------------------------------

ints = st.one_of(st.integers(-3, 70), st.integers(-2**64, 2**64), st.booleans(), st.none(),
                 st.floats(allow_nan=True), st.text(max_size=3))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.none(),
                   st.text(max_size=2), st.booleans())
prompts = st.one_of(
    st.lists(st.integers(0, 300), max_size=80),
    st.lists(st.one_of(st.integers(-5, 10**10), st.booleans(), st.text(max_size=1), st.floats()), max_size=5),
    st.text(max_size=40), st.just("\ud800 lone surrogate"), st.none(), st.integers(),
    st.builds(lambda n: np.arange(n) % 250, st.integers(0, 20)),
)
junk = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def hostile_request(draw):
    """A Request built from random field values, or the construction error, or junk."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "junk"]))
    if kind == "junk":
        return draw(junk)
    try:
        sp = SamplingParams(max_tokens=draw(ints), temperature=draw(floats), top_p=draw(floats),
                            top_k=draw(ints), seed=draw(st.one_of(st.none(), ints)),
                            stop_token_ids=draw(st.one_of(st.lists(ints, max_size=3), ints)),
                            ignore_eos=draw(st.one_of(st.booleans(), ints)))
    except (ValueError, TypeError) as e:  # refused when built: it names the field
        assert any(f in str(e) for f in ("max_tokens", "temperature", "top_p", "top_k", "seed",
                                         "stop_token_ids", "ignore_eos")), e
        sp = SamplingParams(max_tokens=draw(st.integers(1, 200)), ignore_eos=True)
    try:
        return Request(draw(st.sampled_from(["a", "b", "c", ""])), draw(prompts), sp,
                       # (finite arrivals far in the future are valid: run() would wait for them)
                       arrival_s=draw(st.one_of(st.floats(0, 0.01), floats.filter(
                           lambda v: not isinstance(v, (int, float)) or not 0.01 < v < math.inf))),
                       slo_ttft_s=draw(st.one_of(st.none(), floats)),
                       request_id=draw(st.one_of(st.none(), st.integers(0, 5), ints)))
    except (ValueError, TypeError) as e:
        assert any(f in str(e) for f in ("model", "prompt", "arrival_s", "slo_ttft_s",
                                         "request_id", "sampling")), e
        return draw(junk)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(hostile_request(), max_size=4), st.booleans())
def test_random_requests_never_break_the_engine(engine, hostile, realtime):
    before = len(engine.loop.ended)
    reqs = [good_request("a")] + hostile + [good_request("b")]
    outs = engine.run(reqs, realtime=realtime)
    assert len(outs) == len(reqs)
    assert all(o.status in ("finished", "dropped", "failed") for o in outs)
    assert all(o.error for o in outs if o.status == "failed")
    for o in (outs[0], outs[-1]):  # the good neighbours are undisturbed
        assert o.status == "finished" and len(o.token_ids) == 3, o
    assert len(engine.loop.ended) - before == len(reqs)  # each ended exactly once
    assert not engine.scheduler.has_work and engine.scheduler.kv_usage()[0] == 0  # nothing leaks
    assert engine.steady_state_compiles == 0


def test_duplicate_request_id_fails_the_new_request_and_keeps_the_old(engine):
    rid = 10**12 + 77
    first = engine.run([Request("a", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True),
                                request_id=rid)], realtime=False)[0]
    again = engine.run([Request("a", [4, 5], SamplingParams(max_tokens=2), request_id=rid)],
                       realtime=False)[0]
    assert first.status == "finished" and again.status == "failed"
    assert f"duplicate request id {rid}" in again.error
    recs = [r for r in engine.records() if r.request_id == rid]
    assert sorted(r.status for r in recs) == ["failed", "finished"]  # the first is not erased
    assert engine.loop.states[rid].status.value == "finished"


def test_junk_in_the_request_list_fails_alone(engine):
    outs = engine.run([None, good_request(), {"model": "a"}, 3], realtime=False)
    assert [o.status for o in outs] == ["failed", "finished", "failed", "failed"]
    assert "not a Request" in outs[0].error


def test_invalid_arrival_forced_past_validation_fails_the_request(engine):
    bad = good_request()
    object.__setattr__(bad, "arrival_s", math.nan)  # past the dataclass's own check
    outs = engine.run([bad, good_request()], realtime=True)
    assert outs[0].status == "failed" and "arrival_s" in outs[0].error
    assert outs[1].status == "finished"


# -- steps that fail --------------------------------------------------------------------------


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(fault_engine):
    eng = fault_engine
    failed0, recoveries0 = eng.loop.stats.failed_steps, eng.loop.stats.recoveries
    runner = eng.runners["a"]
    real_run, calls = runner.run, []

    def flaky(kind, size, arena, x):
        calls.append(kind)
        if len(calls) == 2:  # the second step of model a: a decode of both a-requests
            raise RuntimeError("injected device fault")
        return real_run(kind, size, arena, x)

    runner.run = flaky
    outs = eng.run([good_request("a", 5), good_request("a", 5), good_request("b", 5)], realtime=False)
    failed = [o for o in outs if o.status == "failed"]
    assert failed and all("injected device fault" in o.error for o in failed)
    assert outs[2].status == "finished" and len(outs[2].token_ids) == 5
    assert eng.loop.stats.failed_steps == failed0 + 1 and eng.loop.stats.recoveries == recoveries0
    runner.run = real_run
    again = eng.run([good_request("a", 4)], realtime=False)[0]
    assert again.status == "finished" and len(again.token_ids) == 4


def test_a_step_that_loses_the_arena_recomputes_running_requests(engine, fault_engine):
    """The donated arena is gone with the failed step: the executor builds a fresh one and
    the requests that were running elsewhere are recomputed, with the same greedy tokens."""
    reqs = lambda: [good_request("a", 8), good_request("b", 8), good_request("b", 8)]  # noqa: E731
    clean = [o.token_ids for o in engine.run(reqs(), realtime=False)]
    eng = fault_engine
    recoveries0, preempt0 = eng.loop.stats.recoveries, eng.scheduler.num_preemptions
    runner = eng.runners["a"]
    real_run, calls = runner.run, []

    def lose_arena(kind, size, arena, x):
        calls.append(kind)
        if len(calls) == 3:
            arena.delete()  # what a donated buffer looks like after a failed execution
            raise RuntimeError("injected: device buffer lost")
        return real_run(kind, size, arena, x)

    runner.run = lose_arena
    try:
        outs = eng.run(reqs(), realtime=False)
    finally:
        runner.run = real_run
    assert outs[0].status == "failed" and "buffer lost" in outs[0].error
    assert eng.loop.stats.recoveries == recoveries0 + 1
    assert eng.scheduler.num_preemptions > preempt0
    assert [o.token_ids for o in outs[1:]] == clean[1:]
    assert not eng.arena.is_deleted()


def test_a_device_that_cannot_recover_marks_the_loop_unusable_once():
    """(The engine's loop, with an executor whose device is gone for good.)"""
    from fineserve_jax.core.clock import VirtualClock
    from fineserve_jax.core.executor import FixedCostExecutor
    from fineserve_jax.core.loop import DeviceLoop

    class DeadDevice(FixedCostExecutor):
        def run(self, plan, while_running):
            raise RuntimeError("injected: device lost")

        def recover(self):
            raise RuntimeError("injected: cannot rebuild")

    loop = DeviceLoop(make_scheduler(), DeadDevice(), VirtualClock())
    reqs = [good_request("a"), good_request("b"), Request("a", [1, 2], arrival_s=5.0)]
    states = loop.run(reqs, realtime=True)
    assert all(s.status.value == "failed" for s in states)
    assert all("could not recover" in s.error for s in states[1:])
    with pytest.raises(LoopBroken, match="could not recover"):
        loop.run([good_request("b")], realtime=False)


def make_scheduler():
    from fineserve_jax.core.model_entry import ModelEntry, ModelLimits
    from fineserve_jax.kvslab import SlabAllocator
    from fineserve_jax.scheduler.local import LocalScheduler
    from mock_cost import FixedCost

    entries = {m: ModelEntry(m, "org", 64, 4, ModelLimits(64, 4, 4), max_len=64) for m in "ab"}
    return LocalScheduler(entries, SlabAllocator(8, 64 * 8), FixedCost(), SchedulerConfig())


def test_a_row_that_cannot_be_built_fails_alone(engine):
    import fineserve_jax.engine.device_executor as dx

    real = dx.build_decode

    def picky(seqs, *a):
        if any(s.request_id == 4242 for s in seqs):
            raise OverflowError("injected: cannot encode this row")
        return real(seqs, *a)

    dx.build_decode = picky
    try:
        bad = Request("a", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True), request_id=4242)
        outs = engine.run([good_request("a", 4), bad, good_request("a", 4)], realtime=False)
    finally:
        dx.build_decode = real
    assert [o.status for o in outs] == ["finished", "failed", "finished"]
    assert "cannot encode this row" in outs[1].error


# -- constructor arguments -------------------------------------------------------------------


@pytest.mark.parametrize("kw,name", [
    ({"tokens_per_block": 0}, "tokens_per_block"), ({"max_model_len": 1}, "max_model_len"),
    ({"arena_bytes": -5}, "arena_bytes"), ({"arena_bytes": 1.5e6}, "arena_bytes"),
    ({"buckets": (1, 2)}, "buckets"), ({"scheduler": "saab"}, "scheduler"),
    ({"compaction_interval": -1}, "compaction_interval"), ({"seed": True}, "seed"),
    ({"arena_bytes": 1024}, "arena"),
])
def test_bad_engine_arguments_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        Engine([ModelSpec("a", "tiny-llama", "org")], **{"profile_reps": 0, **kw})

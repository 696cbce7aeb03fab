"""Record a device-loop run, replay it in the simulator's loop: identical outcomes and times.

The recorded run stands in for the engine (pure Python: a clock with host-time jitter and an
executor with noisy step times); the full engine-backed replay is `experiments.validate_sim
--replay` (tests/test_experiments_sim.py, slow)."""

import dataclasses
import random

import pytest

from fineserve_jax.core.clock import RecordingClock, ReplayClock, ReplayDiverged, VirtualClock
from fineserve_jax.core.executor import FixedCostExecutor
from fineserve_jax.core.loop import DeviceLoop, LoopConfig
from fineserve_jax.core.model_entry import ModelEntry, ModelLimits
from fineserve_jax.core.request import Request
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.kvslab import SlabAllocator
from fineserve_jax.scheduler.local import LocalScheduler, SchedulerConfig
from fineserve_jax.scheduler.step_cost import BucketProfile
from fineserve_jax.sim.replay import ReplayExecutor, compare_runs


class JitterClock(VirtualClock):
    """Virtual time in which every reading costs a little host time, as on a real machine."""

    def __init__(self, seed):
        super().__init__()
        self.rng = random.Random(seed)

    def now(self):
        self.t += self.rng.uniform(0, 2e-4)
        return self.t


class NoisyExecutor(FixedCostExecutor):
    """Step times that vary run to run, and sometimes are not device-bound."""

    def __init__(self, seed):
        super().__init__(prefill_s=2e-3, prefill_s_per_token=2e-5, decode_s=3e-3)
        self.rng = random.Random(seed)

    def run(self, plan, while_running):
        r = super().run(plan, while_running)
        r.seconds *= self.rng.uniform(0.7, 1.5)
        r.bucket = plan.size
        r.device_seconds = r.seconds if self.rng.random() < 0.8 else None
        return r


ENTRIES = {m: ModelEntry(m, p, b, 4, ModelLimits(64, 4, 8), max_len=256)
           for m, p, b in (("a", "org", 64), ("b", "qoq", 96), ("c", "fp8_kv8", 128))}


def profile():
    cost = BucketProfile()
    for m in ENTRIES:
        for n in (1, 2, 4, 8):
            cost.set(m, "decode", n, 3e-3)
        for n in (8, 16, 32, 64):
            cost.set(m, "prefill", n, 2e-3 + 2e-5 * n)
    return cost


def make_loop(executor, clock, config=SchedulerConfig(), num_slabs=12):
    sched = LocalScheduler(ENTRIES, SlabAllocator(num_slabs, 64 * 96 // 16 * 4), profile(), config)
    return DeviceLoop(sched, executor, clock, config=LoopConfig(compaction_interval=4))


def workload(n=240, seed=0):
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(400.0)
        tight = rng.random() < 0.25
        out.append(Request("abc"[i % 3], [1] + [rng.randrange(3, 200) for _ in range(rng.randrange(2, 40))],
                           SamplingParams(max_tokens=rng.randrange(1, 30), ignore_eos=True),
                           arrival_s=t, slo_ttft_s=0.004 if tight else 0.5, request_id=i))
    return out


def record(config=SchedulerConfig()):
    clock = RecordingClock(JitterClock(1))
    loop = make_loop(NoisyExecutor(2), clock, config)
    loop.step_log = []
    states = loop.run(workload(), realtime=True)
    return loop, states, clock.readings


def replay(loop, readings, config=SchedulerConfig()):
    sim = make_loop(ReplayExecutor(loop.step_log, lambda p: p.size), ReplayClock(readings), config)
    return sim, sim.run(workload(), realtime=True)


def test_replay_reproduces_every_outcome_and_time():
    loop, served, readings = record()
    outcomes = {s.status.value for s in served}
    assert outcomes == {"finished", "dropped"}  # the check covers drops ...
    assert loop.scheduler.num_preemptions > 0 and loop.stats.compaction_runs > 0  # ... and more
    sim, replayed = replay(loop, readings)
    cmp = compare_runs(served, replayed)
    assert cmp.identical_outcomes and cmp.requests == 240
    assert cmp.max_ttft_diff_ms == 0.0
    assert sim.scheduler.num_preemptions == loop.scheduler.num_preemptions


def test_a_different_scheduling_rule_is_caught():
    """Mutation: the replay's scheduler differs in one rule (admission order): the replay
    diverges or the outcomes differ."""
    loop, served, readings = record()
    other = SchedulerConfig(admission="shortest")
    try:
        _, replayed = replay(loop, readings, other)
    except ReplayDiverged:
        return
    assert not compare_runs(served, replayed).identical_outcomes


def test_compare_runs_reports_mismatches():
    loop, served, readings = record()
    _, replayed = replay(loop, readings)
    replayed = list(replayed)
    first = next(i for i, s in enumerate(replayed) if s.status.value == "finished")
    replayed[first] = dataclasses.replace(replayed[first], output_token_ids=[])
    cmp = compare_runs(served, replayed)
    assert not cmp.identical_outcomes and cmp.mismatches[0]["request_id"] == first
    with pytest.raises(ValueError):
        compare_runs(served, replayed[:-1])

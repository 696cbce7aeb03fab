"""Local scheduler tests, driven by the one device loop with a fixed-cost executor (no JAX,
no model): step times come from a fixed cost table and sampled tokens are a constant, so
every outcome is exact."""

import pytest

from fineserve_jax.core.clock import VirtualClock
from fineserve_jax.core.executor import FixedCostExecutor
from fineserve_jax.core.loop import DeviceLoop
from fineserve_jax.core.model_entry import ModelEntry, ModelLimits
from fineserve_jax.core.request import Request, RequestState, Status
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.kvslab import SlabAllocator
from fineserve_jax.scheduler.local import LocalScheduler, SchedulerConfig
from mock_cost import FixedCost


def make(num_slabs=16, config=SchedulerConfig(), models=("a", "b"), block_bytes=(64, 96)):
    alloc = SlabAllocator(num_slabs=num_slabs, slab_bytes=192 * 4)
    entries = {m: ModelEntry(m, "org" if i == 0 else "qoq", bb, 4, ModelLimits(128, 4, 8))
               for i, (m, bb) in enumerate(zip(models, block_bytes))}
    return LocalScheduler(entries, alloc, FixedCost(), config), alloc


def seq(rid, model, prompt=6, out=5, arrival=0.0, slo=None):
    """A request, as the scheduler sees it (for tests that call `schedule` directly)."""
    return RequestState(request_id=rid, model=model, prompt_token_ids=list(range(3, 3 + prompt)),
                        sampling=SamplingParams(max_tokens=out, ignore_eos=True),
                        arrival_s=arrival, slo_ttft_s=slo)


def req(rid, model, prompt=6, out=5, arrival=0.0, slo=None):
    return Request(model, list(range(3, 3 + prompt)), SamplingParams(max_tokens=out, ignore_eos=True),
                   arrival_s=arrival, slo_ttft_s=slo, request_id=rid)


def drive(sched, requests):
    """Every request arrives at t=0; the device loop serves them with the fixed costs the
    scheduler's cost table predicts (prefill 1 ms/token, decode 2 ms)."""
    loop = DeviceLoop(sched, FixedCostExecutor(prefill_s_per_token=1e-3, decode_s=2e-3),
                      VirtualClock())
    states = loop.run(requests, realtime=True)
    return states, loop


@pytest.mark.parametrize("execution", ["saab", "round_robin", "fcfs"])
@pytest.mark.parametrize("admission", ["deadline", "fcfs", "shortest", "precision"])
def test_every_request_ends_once_and_memory_returns(admission, execution):
    sched, alloc = make(config=SchedulerConfig(admission=admission, execution=execution))
    ended, loop = drive(sched, [req(i, "ab"[i % 2], prompt=3 + i % 7, out=2 + i % 5) for i in range(40)])
    assert sorted(s.request_id for s in loop.ended) == list(range(40))
    assert all(s.status is Status.FINISHED and len(s.output_token_ids) == s.sampling.max_tokens
               for s in ended)
    assert alloc.used_bytes == 0 and alloc.free_slabs == alloc.num_slabs - 1


def test_preemption_when_memory_runs_out_mid_decode():
    # 3 usable slabs of 12 blocks (64 B) for model a; sequences grow to 10 blocks each.
    sched, alloc = make(num_slabs=4, models=("a",), block_bytes=(64,))
    ended, loop = drive(sched, [req(i, "a", prompt=8, out=30) for i in range(6)])
    assert sched.num_preemptions > 0
    assert sorted(s.request_id for s in loop.ended) == list(range(6))
    assert all(s.status is Status.FINISHED and len(s.output_token_ids) == 30 for s in ended)
    assert alloc.used_bytes == 0


def test_saab_drops_hopeless_requests_but_keeps_feasible_ones():
    sched, _ = make()
    # 100-token prompt at 1 ms/token cannot meet a 50 ms TTFT SLO; the short one can.
    (hopeless, fine), _ = drive(sched, [req(0, "a", prompt=100, slo=0.05),
                                        req(1, "a", prompt=10, slo=0.05)])
    assert hopeless.status is Status.DROPPED and fine.status is Status.FINISHED


def test_no_drop_mode_deprioritises_instead():
    sched, _ = make(config=SchedulerConfig(drop=False))
    (hopeless, _), _ = drive(sched, [req(0, "a", prompt=100, slo=0.05),
                                     req(1, "a", prompt=10, slo=0.05)])
    assert hopeless.status is Status.FINISHED and hopeless.low_priority


def test_saab_prefill_batch_respects_deadlines():
    sched, _ = make()
    # Each 20-token prompt takes 20 ms alone; batching all four (80 ms) would break the
    # 45 ms SLO of the first ones, so saab must split them.
    seqs = [seq(i, "a", prompt=20, out=2, slo=0.045 + 0.03 * i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule(0.0)
    assert out.step.kind == "prefill" and len(out.step.seqs) == 2
    # Mutation: the FCFS baseline ignores deadlines and packs all four.
    sched2, _ = make(config=SchedulerConfig(execution="fcfs"))
    for s in [seq(i, "a", prompt=20, out=2, slo=0.045 + 0.03 * i) for i in range(4)]:
        sched2.add(s)
    assert len(sched2.schedule(0.0).step.seqs) == 4


def test_aging_prevents_starvation_under_shortest_first():
    sched, _ = make(num_slabs=3, config=SchedulerConfig(admission="shortest", aging_s=0.01),
                    models=("a",), block_bytes=(64,))
    states, _ = drive(sched, [req(0, "a", prompt=40, out=2)] +
                      [req(i, "a", prompt=4, out=2) for i in range(1, 30)])
    long = states[0]
    assert long.status is Status.FINISHED


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown execution policy 'x'"):
        SchedulerConfig(execution="x")
    with pytest.raises(ValueError, match="unknown admission policy 'y'"):
        SchedulerConfig(admission="y")


def test_host_overhead_benchmark_runs():
    from experiments.host_overhead import measure

    r = measure(running=32, num_models=4, iters=50)
    assert r["running_requests"] == 32 and r["iterations"] == 50 and r["mean_ms"] > 0


def test_token_slice_equals_slicing_prompt_plus_output():
    s = seq(0, "a", prompt=5)
    s.output_token_ids = [100, 101, 102]
    whole = s.prompt_token_ids + s.output_token_ids
    for a in range(len(whole)):
        for b in range(a, len(whole) + 1):
            assert s.token_slice(a, b) == whole[a:b], (a, b)

"""The cluster simulator: exact outcomes with a hand-computable cost model, conservation for
every system configuration, static KV partitions, replica routing, determinism across worker
processes, and the summary.json schema. Pure Python, no JAX."""

import dataclasses
import logging

import pytest

from fineserve_jax import metrics
from fineserve_jax.core.request import RequestState
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.kvslab import SlabAllocator
from fineserve_jax.scheduler.cost import CostModel
from fineserve_jax.scheduler.execution import ModelLimits
from fineserve_jax.scheduler.footprint import GiB, footprint
from fineserve_jax.scheduler.local import LocalScheduler, ModelEntry, SchedulerConfig
from fineserve_jax.scheduler.placement import ServedModel, place
from fineserve_jax.scheduler.plan import ClusterSpec, PlacedModel, PlacementPlan, make_device
from fineserve_jax.sim import SYSTEMS, SimConfig, get_system, route, run_system, simulate
from fineserve_jax.sim.fleets import fleet_workload, get_fleet, pair8b
from fineserve_jax.workload.spec import WorkloadRequest
from mock_cost import FixedCost

logging.getLogger("fineserve_jax.scheduler.cost").setLevel(logging.ERROR)


class LinearCost:
    """Hand-computable cost model: prefill 50 ms + 1 ms/token, decode 20 ms + 1 ms/sequence."""

    def prefill_time(self, model, preset, num_tokens, batch_size=1, context=0, tp=1):
        return 0.05 + 1e-3 * num_tokens

    def decode_time(self, model, preset, batch_size, context, tp=1):
        return 0.02 + 1e-3 * batch_size

    def default_slo_ttft(self, model, preset, tp=1, *, scale=40.0):
        return 10.0


@pytest.fixture(scope="module")
def cost():
    return CostModel.from_profiles()


def one_device_plan(models=(("a", "llama-3.1-8b", "org"),), arena_gib=20.0, partitions=None):
    cl = ClusterSpec(1, 1)
    placed = []
    for i, (name, cfg, preset) in enumerate(models):
        fp = footprint(cfg, preset)
        placed.append(PlacedModel(name, cfg, preset, 1.0, 10.0, fp.weight_bytes, fp.min_kv_bytes(4096),
                                  None if partitions is None else partitions[i]))
    dev = make_device(0, [0], placed, cl, kv_arena_bytes=int(arena_gib * GiB))
    return PlacementPlan(cl, (dev,), "manual")


def req(rid, model="a", arrival=0.0, prompt=100, output=10, slo=10.0):
    return WorkloadRequest(rid, model, arrival, prompt, output, slo)


@pytest.mark.parametrize("system", ["fineserve", "muxserve", "prism", "spatial"])
def test_one_request_is_exact(system):
    """TTFT = one prefill; every later token one decode step of batch 1."""
    plan = one_device_plan()
    res = simulate(plan, [req(0, arrival=2.5, prompt=100, output=10)], LinearCost(),
                   get_system(system).sim)
    (r,) = res.records
    assert r.status == "finished" and r.num_output_tokens == 10
    assert r.ttft_s == pytest.approx(0.05 + 0.1, abs=1e-12)
    assert r.e2e_s == pytest.approx(0.15 + 9 * 0.021, abs=1e-12)
    assert r.tpot_s == pytest.approx(0.021, abs=1e-12)
    assert res.devices[0].steps == 10


def test_the_first_step_after_idle_pays_the_wakeup_penalty():
    """Only the first step after an idle spell (>= wakeup_idle_s) is charged wakeup_s."""
    cfg = SimConfig(wakeup_s=0.01, wakeup_idle_s=0.005)
    res = simulate(one_device_plan(), [req(0, arrival=1.0, output=3), req(1, arrival=1.5, output=2)],
                   LinearCost(), cfg)
    a, b = res.records
    assert a.ttft_s == pytest.approx(0.15 + 0.01) and a.e2e_s == pytest.approx(0.16 + 2 * 0.021)
    assert b.ttft_s == pytest.approx(0.15 + 0.01)  # the device idled again in between


def test_two_requests_batch_exactly():
    """Both arrive at 0: one prefill of 2 x 100 tokens, then decode steps of batch 2 until the
    short one ends, then batch 1 (fcfs execution, no deadlines in the way)."""
    plan = one_device_plan()
    cfg = SimConfig(scheduler=SchedulerConfig(admission="fcfs", execution="fcfs", drop=False))
    res = simulate(plan, [req(0, output=3), req(1, output=5)], LinearCost(), cfg)
    a, b = res.records
    pf = 0.05 + 0.2
    assert a.ttft_s == pytest.approx(pf) and b.ttft_s == pytest.approx(pf)
    assert a.e2e_s == pytest.approx(pf + 2 * 0.022)
    assert b.e2e_s == pytest.approx(pf + 2 * 0.022 + 2 * 0.021)
    dev = res.devices[0]  # the loop's step counters, split by kind
    assert (dev.steps, dev.prefill_steps) == (5, 1)
    assert dev.prefill_busy_s == pytest.approx(pf)
    assert dev.busy_s == pytest.approx(pf + 2 * 0.022 + 2 * 0.021)


def test_requests_the_engine_would_refuse_fail_and_are_counted():
    plan = one_device_plan()
    reqs = [req(0, prompt=5000), req(1, prompt=50, output=5)]  # 5000 >= max_model_len 4096
    res = simulate(plan, reqs, LinearCost())
    s = res.summary()
    assert s["overall"]["failed"] == 1 and s["overall"]["finished"] == 1
    assert "exceeds the model's maximum" in res.records[0].finish_reason
    metrics.check_conservation(s)


def test_summary_has_the_serve_schema():
    res = simulate(one_device_plan(), [req(i, arrival=0.1 * i) for i in range(5)], LinearCost(),
                   SimConfig(kv_sample_interval_s=0.01))
    s = res.summary()
    for key in ("models", "overall", "kv", "compile", "placement", "sim"):
        assert key in s
    # A simulation compiles nothing: it must not claim zero recompiles it never counted.
    assert s["compile"] == {"warmup_compiles": None, "steady_state_compiles": None, "warmup_s": None}
    assert set(s["overall"]) >= {"requests", "finished", "dropped", "failed", "ttft_s", "tpot_s",
                                 "slo_attainment", "output_tokens_per_s", "duration_s"}
    assert s["kv"]["arena_bytes"] == 20 * GiB and s["kv"]["peak_used_bytes"] > 0
    assert PlacementPlan.from_dict(s["placement"]).to_dict() == s["placement"]


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_every_system_conserves_requests(cost, system):
    fleet = pair8b().scaled(6.0)  # 60 req/s on one GPU: queueing, dropping, preemption
    reqs = fleet_workload(fleet, duration_s=8.0, seed=1)
    if system == "spatial":
        fleet = fleet.with_cluster(gpus_per_node=2)  # dedicated GPUs need one per model
    res = run_system(get_system(system), fleet.models, fleet.cluster, reqs, cost, workers=1)
    s = res.summary()
    metrics.check_conservation(s)
    assert s["overall"]["requests"] == len(reqs)
    for d in res.devices:  # all KV memory returns
        assert d.kv_samples[-1][1] >= 0
    assert all(r.status in ("finished", "dropped", "failed") for r in res.records)


def test_saab_drops_under_overload_and_round_robin_does_not(cost):
    fleet = pair8b().scaled(12.0)
    reqs = fleet_workload(fleet, duration_s=6.0, seed=2)
    fs = run_system(get_system("fineserve"), fleet.models, fleet.cluster, reqs, cost, workers=1).summary()
    mx = run_system(get_system("muxserve"), fleet.models, fleet.cluster, reqs, cost, workers=1).summary()
    assert mx["overall"]["dropped"] == 0
    assert fs["overall"]["slo_attainment"] >= mx["overall"]["slo_attainment"]


def test_static_partitions_do_not_block_other_models():
    """A full partition of model a must not stop model b's admission (LocalScheduler with
    per-model allocators), and preemption picks a victim of the same model."""
    allocs = {"a": SlabAllocator(3, 64), "b": SlabAllocator(8, 64)}  # a: 2 blocks, b: 7 blocks
    entries = {m: ModelEntry(m, "org", 64, 4, ModelLimits(64, 8, 8)) for m in allocs}
    sched = LocalScheduler(entries, None, FixedCost(), SchedulerConfig(admission="fcfs", execution="fcfs"),
                           allocators=allocs)
    seqs = [RequestState(i, m, [3] * 8, SamplingParams(max_tokens=2, ignore_eos=True), 0.0, None)
            for i, m in enumerate(["a", "a", "b"])]
    for s in seqs:
        sched.add(s)
    sched.schedule(0.0)
    assert [s.status.value for s in seqs] == ["running", "waiting", "running"]
    assert allocs["a"].used_bytes == 128 and allocs["b"].used_bytes == 128
    with pytest.raises(ValueError, match="no KV pool"):
        LocalScheduler(entries, None, FixedCost(), allocators={"a": allocs["a"]})




def test_static_partition_memory_comes_from_the_plan():
    plan = one_device_plan((("a", "llama-3.1-8b", "org"), ("b", "llama-3.1-8b", "fp8_kv8")),
                           arena_gib=8.0, partitions=[6 * GiB, 2 * GiB])
    from fineserve_jax.sim import DeviceSim

    dev = DeviceSim(plan.devices[0], LinearCost(), SimConfig(kv="static"))
    a, b = dev.scheduler.pool("a"), dev.scheduler.pool("b")
    assert a.total_bytes <= 6 * GiB and a.total_bytes > 6 * GiB - footprint("llama-3.1-8b", "org").block_bytes
    assert b.total_bytes <= 2 * GiB and not dev.scheduler.shared


def test_replicas_share_the_load(cost):
    models = [ServedModel("hot", "llama-3.1-8b", "org", 40.0)]
    plan = place(models, ClusterSpec(1, 2), cost, "spatial")
    assert len(plan.devices) == 2
    reqs = [req(i, "hot", arrival=0.02 * i, output=50) for i in range(400)]
    per_dev, unplaced = route(reqs, plan, cost)
    counts = sorted(len(v) for v in per_dev.values())
    assert unplaced == [] and sum(counts) == 400 and counts[0] >= 150


def test_unplaced_models_fail_and_are_conserved():
    res = simulate(one_device_plan(), [req(0), req(1, model="ghost")], LinearCost())
    s = res.summary()
    assert s["models"]["ghost"]["failed"] == 1 and s["overall"]["finished"] == 1


def test_parallel_workers_give_identical_results(cost):
    fleet = get_fleet("mixed8").scaled(0.5)
    plan = place(fleet.models, fleet.cluster, cost, "fineserve")
    slos = plan.model_slos()
    reqs = [dataclasses.replace(r, slo_ttft_s=slos[r.model])
            for r in fleet_workload(fleet, duration_s=10.0, seed=3)]
    one = simulate(plan, reqs, cost, SimConfig(workers=1)).summary()
    two = simulate(plan, reqs, cost, SimConfig(workers=2)).summary()
    for s in (one, two):
        s.pop("sim")
    assert one == two

"""The router shared by the simulator and by real nodes and clusters (pure Python, no JAX):
the same workload is split over a plan's devices identically whether it is routed as the
simulator's workload requests or as the engine requests a node or the Ray driver serves, and
the simulator's devices serve exactly those shares. Plus the node topology of a plan and the
merging of per-device KV series."""

from __future__ import annotations

import dataclasses

import pytest

from fineserve_jax import sim
from fineserve_jax.cluster import (local_gpus, node_devices, node_plan, plan_nodes, route,
                                   route_requests)
from fineserve_jax.cluster.summary import merge_kv_samples
from fineserve_jax.core.request import Request
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.scheduler.plan import PlacementPlan
from fineserve_jax.sim.config import SimConfig
from fineserve_jax.workload import ModelLoad, generate_workload
from fineserve_jax.scheduler.cost import load_cost_model
from test_node import tiny_plan

# Real-size shapes: the router's load estimate comes from the cost model's profiles.
PLAN = PlacementPlan.from_dict(tiny_plan([
    ((0, 1), 8 << 30, [("chat", "llama-3.1-8b", "org", 6.0)]),
    ((2,), 8 << 30, [("code", "mistral-7b", "fp8_kv8", 6.0)]),
    ((4,), 8 << 30, [("code", "mistral-7b", "fp8_kv8", 6.0),
                     ("small", "qwen2.5-7b", "int8_kv8", 3.0)]),
], nodes=2, gpus_per_node=4, max_model_len=4096))


def _workload(n=120):
    loads = [ModelLoad("chat", 6.0, 2.0), ModelLoad("code", 12.0, 2.0), ModelLoad("small", 3.0, 2.0),
             ModelLoad("ghost", 1.0, 2.0)]
    return generate_workload(loads, num_requests=n, seed=3)


def _engine_requests(wl):
    return [Request(model=w.model, prompt=w.prompt_tokens(320), arrival_s=w.arrival_s,
                    sampling=SamplingParams(max_tokens=int(w.output_len)), request_id=w.request_id)
            for w in wl]


def _ids(per):
    return {d: [r.request_id for r in v] for d, v in per.items()}


@pytest.fixture(scope="module")
def cost():
    return load_cost_model()


def test_simulator_and_engines_route_alike(cost):
    wl = _workload()
    sim_split, sim_unplaced = route(wl, PLAN, cost)
    eng_split, eng_unplaced = route_requests(_engine_requests(wl), PLAN, cost)
    assert _ids(eng_split) == _ids(sim_split)
    assert [r.request_id for r in eng_unplaced] == [r.request_id for r in sim_unplaced]
    assert {r.model for r in sim_unplaced} == {"ghost"}
    # The replicated model is spread over both copies, least-loaded first: the copy that
    # shares its device with another model (a longer predicted decode round) gets fewer.
    code = {d: sum(r.model == "code" for r in v) for d, v in sim_split.items()}
    assert code[1] > code[2] > 0
    # The simulator serves exactly the router's shares on every device.
    res = sim.simulate(PLAN, wl, cost, SimConfig(workers=1), check=False)
    served = {d.device_id: sorted(r.request_id for r in d.records) for d in res.devices}
    assert served == {d: sorted(v) for d, v in _ids(sim_split).items()}
    assert sim.route is route


def test_router_reads_the_lengths_mutation(cost):
    """Mutation: engine requests routed with another output length (a different load
    estimate) no longer split like the simulator's workload."""
    wl = _workload()
    reqs = [dataclasses.replace(r, sampling=SamplingParams(max_tokens=1)) if r.model == "code"
            and r.request_id % 2 else r for r in _engine_requests(wl)]
    assert _ids(route_requests(reqs, PLAN, cost)[0]) != _ids(route(wl, PLAN, cost)[0])
    with pytest.raises(ValueError, match="unique request ids"):
        route_requests(_engine_requests(wl)[:2] * 2, PLAN, cost)


def test_plan_topology():
    nodes = plan_nodes(PLAN)
    assert {k: [d.id for d in v] for k, v in nodes.items()} == {0: [0, 1], 1: [2]}
    assert local_gpus(PLAN, PLAN.devices[2]) == (0,)
    assert local_gpus(PLAN, PLAN.devices[0]) == (0, 1)
    assert [d.id for d in node_plan(PLAN, 1).devices] == [2]
    assert node_plan(PLAN, 0).model_names == ["chat", "code"]
    with pytest.raises(ValueError, match="node 5 holds no device"):
        node_devices(PLAN, 5)


def test_merge_kv_samples_sums_latest_values():
    a = [(0.0, 10, 20), (2.0, 30, 40)]
    b = [(1.0, 1, 2), (3.0, 0, 0)]
    got = merge_kv_samples([(a, 2), (b, 1)])
    assert got == [(0.0, 20, 40), (1.0, 21, 42), (2.0, 61, 82), (3.0, 60, 80)]
    assert merge_kv_samples([([], 1)]) == []

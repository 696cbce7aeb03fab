"""Global placement: memory safety over random fleets (hypothesis), clear errors for fleets
that do not fit, the plan file format, the plan checker (with mutations it must reject), the
load estimator's closed form, and re-placement. Pure Python, no JAX."""

import dataclasses
import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fineserve_jax.scheduler.cost import CostModel
from fineserve_jax.scheduler.footprint import GiB, footprint
from fineserve_jax.scheduler.load_estimate import estimate_device, profile_model
from fineserve_jax.scheduler.placement import (POLICIES, PlacementConfig, PlacementError, ServedModel,
                                               cluster_partitions, node_patterns, place, replan)
from fineserve_jax.scheduler.plan import ClusterSpec, PlacementPlan, PlanError, check_plan
from models.presets import get_model_config

logging.getLogger("fineserve_jax.scheduler.cost").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def cost():
    return CostModel.from_profiles()


# qwen2.5-7b (28 query heads) cannot run at tp 8, smollm2-135m (9 / 3 heads) at any tp in (2, 4, 8)
CONFIGS = ["llama-3.1-8b", "qwen2.5-32b", "llama-3.1-70b", "llama-7b", "llama-13b", "llama-30b",
           "llama-65b", "mistral-7b", "qwen2.5-7b", "smollm2-135m"]
PRESETS = ["org", "fp8", "fp8_kv8", "awq", "qoq", "int8", "int8_kv8"]


def per_gpu_bytes_ok(plan: PlacementPlan) -> None:
    """The memory rule, recomputed here from the configs (independently of check_plan)."""
    usable = plan.cluster.gpu_memory_bytes * plan.cluster.memory_utilization
    for d in plan.devices:
        need = 0.0
        for m in d.models:
            cfg = get_model_config(m.config)
            assert cfg.num_heads % d.tp == 0, (m.config, d.tp)  # the engine could not run it
            assert cfg.num_kv_heads % d.tp == 0 or d.tp % cfg.num_kv_heads == 0, (m.config, d.tp)
            fp = footprint(m.config, m.preset, plan.tokens_per_block, d.tp)
            need += (fp.weight_bytes + fp.min_kv_bytes(plan.max_model_len)) / d.tp
        assert need <= usable + 1, (d.id, need / GiB, usable / GiB)
        assert d.kv_arena_bytes >= sum(m.min_kv_bytes for m in d.models)


fleets = st.fixed_dictionaries({
    "nodes": st.integers(1, 2),
    "gpus": st.sampled_from([1, 2, 4, 8]),
    "mem_gib": st.sampled_from([24, 40, 48, 80, 141]),
    "models": st.lists(st.tuples(st.sampled_from(CONFIGS), st.sampled_from(PRESETS),
                                 st.floats(0.0, 30.0)), min_size=1, max_size=6),
    "policy": st.sampled_from(POLICIES),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets)
def test_placement_never_overcommits_memory(cost, f):
    cluster = ClusterSpec(f["nodes"], f["gpus"], f["mem_gib"] * GiB)
    models = [ServedModel(f"m{i}", c, p, r) for i, (c, p, r) in enumerate(f["models"])]
    cfg = PlacementConfig(max_model_len=2048, max_partitions=40)
    try:
        plan = place(models, cluster, cost, f["policy"], cfg)
    except PlacementError as e:
        assert e.model in {m.name for m in models}
        assert e.model in str(e)
        return
    check_plan(plan)
    per_gpu_bytes_ok(plan)
    gpus = [g for d in plan.devices for g in d.gpus]
    assert len(gpus) == len(set(gpus)) and all(0 <= g < cluster.num_gpus for g in gpus)
    assert set(plan.model_names) == {m.name for m in models}  # every model is served
    for m in models:  # the copies' rates add up to the model's rate
        assert plan.model_rates()[m.name] == pytest.approx(m.rate, abs=1e-9)


def test_a_model_too_big_for_any_group_is_named(cost):
    cluster = ClusterSpec(1, 1)  # one 80 GiB GPU cannot hold 70B in bf16
    models = [ServedModel("small", "llama-3.1-8b", "org", 1.0),
              ServedModel("huge", "llama-3.1-70b", "org", 1.0)]
    for policy in POLICIES:
        with pytest.raises(PlacementError, match="model 'huge' \\(llama-3.1-70b/org\\) does not fit") as e:
            place(models, cluster, cost, policy)
        assert e.value.model == "huge"


def test_a_fleet_too_big_for_the_cluster_names_a_model(cost):
    cluster = ClusterSpec(1, 2)  # each 32B bf16 fits one GPU alone, three do not fit two GPUs
    models = [ServedModel(f"q{i}", "qwen2.5-32b", "org", 1.0) for i in range(3)]
    for policy in POLICIES:
        with pytest.raises(PlacementError) as e:
            place(models, cluster, cost, policy)
        assert e.value.model in {"q0", "q1", "q2"} and e.value.model in str(e.value)


def test_node_patterns_and_partitions():
    assert sorted(node_patterns(4, [1, 2, 4])) == [(1, 1, 1, 1), (2, 1, 1), (2, 2), (4,)]
    assert len(node_patterns(8, [1, 2, 4, 8])) == 10
    cl = ClusterSpec(4, 8)
    parts = cluster_partitions(cl, [1, 2, 4, 8], limit=300)
    assert all(len(p) == 4 and all(sum(x) == 8 for x in p) for p in parts)
    assert len(parts) <= 300 and [(8,)] * 4 in parts and [(1,) * 8] * 4 in parts


def small_plan(cost, policy="fineserve"):
    models = [ServedModel("a", "llama-3.1-8b", "org", 4.0), ServedModel("b", "llama-3.1-8b", "fp8_kv8", 4.0),
              ServedModel("c", "qwen2.5-32b", "fp8_kv8", 1.0)]
    return place(models, ClusterSpec(1, 2), cost, policy)


def test_plan_file_round_trip(cost, tmp_path):
    plan = small_plan(cost)
    path = tmp_path / "plan.json"
    plan.save(path)
    back = PlacementPlan.load(path)
    assert back.to_dict() == plan.to_dict()
    assert back.devices == plan.devices and back.cluster == plan.cluster
    bad = plan.to_dict()
    bad["version"] = 99
    with pytest.raises(PlanError, match="unsupported plan version 99"):
        PlacementPlan.from_dict(bad)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(PlanError, match="not JSON"):
        PlacementPlan.load(tmp_path / "junk.json")


def test_checker_rejects_mutated_plans(cost):
    """Mutations of a valid plan that break the memory rule or the structure must be refused."""
    plan = small_plan(cost)
    check_plan(plan)
    d0 = plan.devices[0]
    fp70 = footprint("llama-3.1-70b", "org")
    intruder = dataclasses.replace(d0.models[0], name="intruder", config="llama-3.1-70b", preset="org",
                                   weight_bytes=fp70.weight_bytes,
                                   min_kv_bytes=fp70.min_kv_bytes(plan.max_model_len))

    def with_dev(**kw):
        return dataclasses.replace(plan, devices=(dataclasses.replace(d0, **kw),) + plan.devices[1:])

    mutants = {
        "exceed": with_dev(models=d0.models + (intruder,)),  # a 70B bf16 squeezed in
        "understated": with_dev(models=(dataclasses.replace(d0.models[0], weight_bytes=1),) + d0.models[1:]),
        "arena": with_dev(kv_arena_bytes=d0.kv_arena_bytes + GiB),
        "overlap": dataclasses.replace(plan, devices=plan.devices + (dataclasses.replace(d0, id=99),)),
        "outside": with_dev(gpus=(57,)),
    }
    for name, bad in mutants.items():
        with pytest.raises(PlanError):
            check_plan(bad)
    with pytest.raises(PlanError, match="exceed"):
        check_plan(mutants["exceed"])
    with pytest.raises(PlanError, match="declares 1 weight bytes"):
        check_plan(mutants["understated"])
    with pytest.raises(PlanError, match="already used by device"):
        check_plan(mutants["overlap"])


def test_estimator_closed_form(cost):
    fp = footprint("llama-3.1-8b", "org")
    p = profile_model(cost, "a", "llama-3.1-8b", "org", 1, 10.0, 161, 338, 1.0, fp.kv_bytes_per_token,
                      fp.weight_bytes, fp.min_kv_bytes(4096))
    e = estimate_device([p], 50 * GiB)
    rho = 10.0 * (p.prefill_s + 338 * p.decode_per_seq_s)
    assert e.load == pytest.approx(rho)
    assert e.tpot_s == pytest.approx(p.decode_base_s / (1 - rho))
    assert e.kv_demand_bytes["a"] == pytest.approx(10.0 * 338 * e.tpot_s * (161 + 169) * fp.kv_bytes_per_token)
    assert e.tokens_per_s == pytest.approx(10.0 * 338) and e.served["a"] == 1.0
    # Memory-bound: the arena holds half of the required 2x headroom, half the tokens are served.
    half = estimate_device([p], e.kv_demand_bytes["a"], kv_headroom=2.0)
    assert half.served["a"] == pytest.approx(0.5) and not half.slo_ok["a"]
    # Overloaded: rho > 1 serves 1 / rho and meets no SLO.
    over = estimate_device([p.with_rate(10.0 / rho * 2)], 50 * GiB)
    assert over.served["a"] == pytest.approx(0.5) and math.isinf(over.tpot_s) and not over.slo_ok["a"]


def test_spatial_gives_every_model_its_own_gpus(cost):
    models = [ServedModel(f"m{i}", "llama-3.1-8b", "org", 1.0) for i in range(3)]
    plan = place(models, ClusterSpec(1, 4), cost, "spatial")
    assert all(len(d.models) == 1 for d in plan.devices)
    assert plan.gpus_used == 4  # the spare GPU holds a replica


def test_colocating_policies_share_devices_when_gpus_are_few(cost):
    models = [ServedModel(f"m{i}", "llama-3.1-8b", p, 2.0) for i, p in enumerate(["org", "fp8_kv8", "awq"])]
    for policy in ("fineserve", "muxserve", "prism"):
        plan = place(models, ClusterSpec(1, 2), cost, policy)
        assert sum(len(d.models) for d in plan.devices) >= 3
        per_gpu_bytes_ok(plan)


def test_replicas_split_a_hot_model(cost):
    hot = ServedModel("hot", "llama-3.1-8b", "org", 120.0)  # far beyond one GPU at target load
    plan = place([hot], ClusterSpec(1, 4), cost, "fineserve", PlacementConfig(replicate_leftover=False))
    copies = plan.instances()["hot"]
    assert len(copies) >= 2 and sum(m.rate for _, m in copies) == pytest.approx(120.0)


def test_replan_keeps_a_plan_that_still_holds_and_moves_when_it_must(cost):
    models = [ServedModel("a", "llama-3.1-8b", "org", 2.0), ServedModel("b", "llama-3.1-8b", "fp8_kv8", 2.0)]
    plan = place(models, ClusterSpec(1, 2), cost, "fineserve", PlacementConfig(replicate_leftover=False))
    lower = [dataclasses.replace(m, rate=1.0) for m in models]
    r = replan(plan, lower, cost)
    assert r.kept and r.moved == () and r.plan.model_rates() == {"a": 1.0, "b": 1.0}
    hotter = [dataclasses.replace(models[0], rate=150.0), models[1]]
    r2 = replan(plan, hotter, cost)
    assert not r2.kept
    check_plan(r2.plan)
    assert r2.plan.model_rates()["a"] == pytest.approx(150.0)


def test_footprint_counts_kv_heads_replicated_over_a_wider_group():
    """tiny-mistral has 1 KV head: at tp 2 / 4 every GPU stores it (as the engine does), so the
    group's KV bytes are tp times the model's, and the k/v projections are held tp times."""
    from fineserve_jax.engine.sharding import kv_split, local_kv_format

    one = footprint("tiny-mistral", "org", 16)
    for tp in (2, 4):
        fp = footprint("tiny-mistral", "org", 16, tp)
        engine_fmt = local_kv_format(one.kv_format, kv_split(4, 1, tp))  # one GPU's blocks
        assert fp.kv_format.block_bytes == tp * engine_fmt.block_bytes == tp * one.block_bytes
        assert fp.min_kv_bytes(64) == tp * one.min_kv_bytes(64)
        assert fp.weight_bytes > one.weight_bytes
    # split, not replicated: the group holds exactly the model's bytes
    wide, narrow = footprint("llama-3.1-70b", "fp8_kv8", 16, 8), footprint("llama-3.1-70b", "fp8_kv8", 16)
    assert (wide.block_bytes, wide.weight_bytes) == (narrow.block_bytes, narrow.weight_bytes)
    with pytest.raises(ValueError, match="query heads"):
        footprint("qwen2.5-7b", "org", 16, 8)


def test_placement_only_uses_tp_sizes_the_heads_split_over(cost):
    cluster = ClusterSpec(1, 8)
    with pytest.raises(PlacementError, match="heads do not split") as e:
        place([ServedModel("q", "qwen2.5-7b", "org", 1.0)], cluster, cost,
              config=PlacementConfig(tp_choices=(8,)))
    assert e.value.model == "q"
    plan = place([ServedModel("q", "qwen2.5-7b", "org", 40.0)], cluster, cost, "spatial")
    assert {d.tp for d in plan.devices} <= {1, 2, 4}


def test_checker_rejects_a_tp_the_heads_do_not_split_over(cost):
    plan = place([ServedModel("q", "qwen2.5-7b", "org", 1.0)], ClusterSpec(1, 8), cost, "spatial")
    d0 = plan.devices[0]
    wide = dataclasses.replace(plan, devices=(dataclasses.replace(d0, gpus=tuple(range(8))),))
    with pytest.raises(PlanError, match="query heads"):
        check_plan(wide)


def test_cost_geometry_counts_replicated_kv_reads():
    from fineserve_jax.scheduler.cost.geometry import Geometry

    g = Geometry.from_config(get_model_config("tiny-mistral"))  # 1 KV head
    assert g.kv_bytes_per_token("int8", 2) == 2 * g.kv_bytes_per_token("int8")
    g70 = Geometry.from_config(get_model_config("llama-3.1-70b"))  # 8 KV heads
    assert g70.kv_bytes_per_token("int8", 8) == g70.kv_bytes_per_token("int8")

"""A plan across two nodes on Ray (the `cluster` extra), on one machine: `ray.init()` starts a
local Ray; each node actor gets 2 CPU virtual devices for its 2 GPUs (its runtime environment
sets XLA_FLAGS before the actor imports JAX). Both tests run in subprocesses.

1. (default suite) One Ray session, two node actors (a tp2 group on node 0, a single GPU on
   node 1): a workload served to the end (every request finishes, conservation across the
   cluster, a section per node), then a second workload during which node 1's actor is
   killed: the requests it had not reported fail with the reason, node 0's finish, nothing
   is lost. Mutation: a summary that forgets the dead node's requests is refused.
2. (slow) `python -m experiments.serve_cluster --plan=PLAN` end to end: a tp2 node and a node
   with two models on one GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_node import ROOT, run_serve, tiny_plan

pytest.importorskip("ray", reason="the Ray cluster tests need the `cluster` extra")

TWO_NODES = [
    ((0, 1), 1 << 18, [("chat", "tiny-llama", "org", 10.0)]),            # node 0, tp2
    ((2,), 1 << 17, [("code", "tiny-mistral", "fp8_kv8", 8.0),           # node 1, tp1
                     ("small", "tiny-qwen2", "int8_kv8", 6.0)]),
]


@pytest.mark.slow
def test_two_node_plan_served_through_ray_cli(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(tiny_plan(TWO_NODES, nodes=2, gpus_per_node=2)))
    proc, s = run_serve("experiments.serve_cluster",
                        [f"--plan={plan}", "--num_requests=40", "--cpu_devices_per_node=2"],
                        tmp_path / "out", devices=1)
    assert set(s["models"]) == {"chat", "code", "small"}
    assert s["overall"]["requests"] == 40 == s["overall"]["finished"]
    for m in s["models"].values():
        assert m["requests"] == m["finished"] + m["dropped"] + m["failed"] > 0
    nodes = {n["node"]["node"]: n for n in s["nodes"]}
    assert set(nodes) == {0, 1}
    assert sum(n["overall"]["requests"] for n in nodes.values()) == 40
    assert [d["tp"] for d in nodes[0]["devices"]] == [2]
    assert set(nodes[1]["models"]) == {"code", "small"} and nodes[1]["devices"][0]["tp"] == 1
    assert s["compile"]["steady_state_compiles"] == 0
    assert s["config"]["dead_nodes"] == {}
    assert s["config"]["nodes"]["0"] == {"num_cpus": 1}


@pytest.fixture(scope="module")
def ray_runs(tmp_path_factory):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path_factory.mktemp("ray") / "runs.json"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_two_nodes_serve_a_plan_with_conservation(ray_runs):
    s = ray_runs["clean"]
    assert s["overall"]["requests"] == 40 == s["overall"]["finished"]
    for name in ("a", "b"):
        m = s["models"][name]
        assert m["requests"] == m["finished"] == 20
    nodes = {n["node"]["node"]: n for n in s["nodes"]}
    assert set(nodes) == {0, 1}
    assert [d["tp"] for d in nodes[0]["devices"]] == [2] and nodes[1]["devices"][0]["tp"] == 1
    assert nodes[0]["devices"][0]["jax_devices"] == ["cpu:0", "cpu:1"]
    assert {n: nodes[n]["overall"]["requests"] for n in nodes} == {0: 20, 1: 20}
    assert s["compile"]["steady_state_compiles"] == 0 and s["compile"]["warmup_compiles"] > 0
    assert s["config"]["nodes"] == {"0": {"num_cpus": 1}, "1": {"num_cpus": 1}}
    assert s["kv"]["arena_bytes"] == sum(n["kv"]["arena_bytes"] for n in nodes.values())


def test_killed_node_fails_its_requests_with_a_reason(ray_runs):
    r = ray_runs["killed"]
    assert r["dead"] == [1]
    assert r["outputs"] == r["requests"] == 40
    node1 = r["by_node"]["1"]
    assert node1["failed"] > 0 and node1["failed"] + node1["finished"] == 20
    assert all("node 1 died" in e and "Actor" in e for e in node1["errors"])
    assert r["by_node"]["0"] == {"finished": 20, "failed": 0, "errors": []}
    s = r["summary"]
    assert s["overall"]["failed"] == node1["failed"] and s["overall"]["requests"] == 40
    assert s["config"]["dead_nodes"]["1"].startswith("node 1 died")
    assert s["compile"]["steady_state_compiles"] is None  # unknown for the dead node
    assert r["mutation_refused"]


def _kill_worker(out):
    import dataclasses

    import ray

    from fineserve_jax import metrics
    from fineserve_jax.cluster.ray_cluster import RayCluster
    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.core.request import Request
    from fineserve_jax.core.sampling_params import SamplingParams
    from fineserve_jax.scheduler.plan import PlacementPlan

    plan = PlacementPlan.from_dict(tiny_plan(
        [((0, 1), 1 << 17, [("a", "tiny-llama", "org", 5.0)]),
         ((2,), 1 << 17, [("b", "tiny-llama", "org", 5.0)])], nodes=2, gpus_per_node=2))
    options = {"engine_kwargs": {"buckets": Buckets(decode_sizes=(8,), prefill_sizes=(32,)),
                                 "max_model_len": 128, "tokens_per_block": 4,
                                 "slab_target_bytes": 1, "compilation_cache_dir": None}}
    cluster = RayCluster(plan, node_options=options, cpu_devices_per_node=2,
                         ray_init_kwargs={"num_cpus": 2, "include_dashboard": False})
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    reqs = [Request(model=m, prompt=[1] + [3 + (7 * i + j) % 250 for j in range(10)],
                    sampling=sp, arrival_s=0.1 * i, request_id=2 * i + (m == "b"))
            for i in range(20) for m in ("a", "b")]
    killed = []

    def kill_node_1(c, outputs):
        # Once node 1 has reported something: it dies with requests still in flight.
        if not killed and any(o.model == "b" for o in outputs.values()):
            ray.kill(c.actors[1])
            killed.append(1)

    try:
        cluster.wait_ready()
        clean = cluster.serve(reqs, poll_s=0.1)
        reqs = [dataclasses.replace(r, request_id=r.request_id + 100) for r in reqs]
        result = cluster.serve(reqs, on_poll=kill_node_1, poll_s=0.1)
    finally:
        cluster.shutdown()
        ray.shutdown()
    by_node = {}
    for node, model in (("0", "a"), ("1", "b")):
        outs = [o for o in result.outputs.values() if o.model == model]
        by_node[node] = {"finished": sum(o.status == "finished" for o in outs),
                         "failed": sum(o.status == "failed" for o in outs),
                         "errors": sorted({o.error for o in outs if o.status == "failed"})}
    # Mutation: a summary without the dead node's failed requests is refused.
    lost = [r for r in result.records if not (r.model == "b" and r.status == "failed")]
    s = metrics.summarize(lost)
    s["overall"]["requests"] = len(reqs)
    try:
        metrics.check_conservation(s)
        refused = False
    except metrics.ConservationError:
        refused = True
    with open(out, "w") as f:
        json.dump({"clean": clean.summary, "killed": {
            "dead": sorted(result.dead_nodes), "requests": len(reqs),
            "outputs": len(result.outputs), "by_node": by_node, "summary": result.summary,
            "mutation_refused": refused}}, f)


if __name__ == "__main__":
    _kill_worker(sys.argv[1])

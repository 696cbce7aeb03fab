"""Serve a placement plan across nodes on Ray: one node actor per node of the plan.

    python -m experiments.serve_cluster --plan=PLAN.json --output_dir=runs/cluster

Needs the `cluster` extra (`pip install -e '.[cluster]'`). Without --ray_address a local Ray
instance is started (`ray.init()`); when it has no GPUs, each node actor gets
--cpu_devices_per_node virtual CPU devices (default: the plan's GPUs per node) standing in
for its GPUs. Takes the workload and engine flags of `experiments.serve` (rates and SLOs come
from the plan); writes OUTPUT_DIR/summary.json in the same schema as `experiments.serve`, with
a section per node (each a node's summary, with its devices), and OUTPUT_DIR/latency.png.
"""

from __future__ import annotations

import time

from absl import app, flags

from experiments import serve

_ADDRESS = flags.DEFINE_string("ray_address", None, "a running Ray cluster (default: start one "
                               "locally)")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices_per_node", 0, "virtual CPU devices per node actor when Ray has no GPUs "
    "(0: the plan's GPUs per node)")
_TIMEOUT = flags.DEFINE_float("timeout_s", 3600.0, "fail the requests of nodes that have not "
                              "finished by then")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not serve._PLAN.value:
        raise app.UsageError("--plan is required")
    from fineserve_jax.cluster.ray_cluster import RayCluster, import_ray
    from fineserve_jax.scheduler.plan import PlacementPlan

    plan = PlacementPlan.load(serve._PLAN.value)
    arena = (int(serve._ARENA_MB.value * (1 << 20)) if flags.FLAGS["arena_mb"].present else None)
    options = dict(engine_kwargs=serve._engine_kwargs(), arena_bytes_per_gpu=arena,
                   dtype=serve._DTYPE.value, seed=serve._SEED.value)
    ray = import_ray()
    t0 = time.perf_counter()
    cluster = RayCluster(plan, node_options=options, cpu_devices_per_node=_CPU_DEVICES.value or None,
                         address=_ADDRESS.value,
                         ray_init_kwargs={"include_dashboard": False, "log_to_driver": True})
    try:
        info = cluster.wait_ready()
        print(f"{len(info)} node actors ready in {time.perf_counter() - t0:.1f}s: " + "; ".join(
            f"node {k}: pid {v['pid']}, {len(v['jax_devices'])} devices, "
            f"{v['warmup_compiles']} compiles" for k, v in info.items()))
        for k, why in cluster.dead.items():
            print(f"node {k}: {why}")
        names = plan.model_names
        rates = plan.model_rates()
        # --slo_ttft_s, else the plan's SLOs (a model without one has none: the node actors'
        # profiles are not on the driver to derive one from).
        slos = (dict(zip(names, (float(x) for x in serve._SLO.value))) if serve._SLO.value
                else plan.model_slos())
        reqs = serve.build_requests(serve.plan_vocab_sizes(plan), names,
                                    [rates[n] for n in names], serve._NUM.value,
                                    serve._DURATION.value, serve._SEED.value, slos)
        config = {"models": plan.model_presets(), "plan": serve._PLAN.value, "rates": rates,
                  "slo_ttft_s": slos, "admission": serve._ADMISSION.value,
                  "execution": serve._EXECUTION.value, "attention_impl": serve._IMPL.value,
                  "seed": serve._SEED.value}
        result = cluster.serve(reqs, config=config, timeout_s=_TIMEOUT.value)
    finally:
        cluster.shutdown()
        ray.shutdown()
    assert len(result.outputs) == len(reqs)
    serve.write_outputs(result.summary, result.records, "serve cluster")
    c = result.summary["compile"]
    print(f"{len(cluster.actors)} nodes, {len(result.dead_nodes)} died; compiles: warm-up "
          f"{c['warmup_compiles']}, after warm-up {c['steady_state_compiles']}")


if __name__ == "__main__":
    app.run(main)

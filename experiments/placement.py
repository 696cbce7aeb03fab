"""Global placement of a fleet with every policy: print the plans and write them as JSON.

    python -m experiments.placement --output_dir=runs/placement
    python -m experiments.placement --fleet=lmsys --policies=fineserve,muxserve

For each policy writes OUTPUT_DIR/plan_<policy>.json (the file the simulator and the engine
launcher read, `fineserve_jax.scheduler.plan`) and prints the devices with their models,
memory and predicted load; OUTPUT_DIR/placement.json collects the predicted totals.
With --new_rate_scale, also re-places for the scaled rates (`placement.replan`) and reports
whether the plan held and which models moved. Nonsense flag values (non-positive or NaN
scales, non-positive lengths, unknown policies) are usage errors before any work.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from experiments.flag_checks import check_placement_flags

_FLEET = flags.DEFINE_string("fleet", "mixed8", "fleet: pair8b | mixed8 | lmsys")
_POLICIES = flags.DEFINE_list("policies", ["fineserve", "muxserve", "prism", "spatial"], "policies")
_RATE_SCALE = flags.DEFINE_float("rate_scale", 1.0, "multiply every model's rate")
_NEW_SCALE = flags.DEFINE_float("new_rate_scale", 0.0, "if > 0: re-place for rates x this")
_SLO_SCALE = flags.DEFINE_float("slo_scale", 40.0, "TTFT SLO = scale x TTFT(903-token prompt) + 4 ms")
_MAXLEN = flags.DEFINE_integer("max_model_len", 4096, "longest prompt + output")
_NODES = flags.DEFINE_integer("nodes", 0, "override the fleet's node count")
_GPUS = flags.DEFINE_integer("gpus_per_node", 0, "override the fleet's GPUs per node")
_MEM = flags.DEFINE_float("gpu_memory_gib", 0.0, "override GPU memory (GiB)")
_OUT = flags.DEFINE_string("output_dir", "runs/placement", "where to write the plans")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_placement_flags(
        fleet=_FLEET.value, policies=_POLICIES.value, rate_scale=_RATE_SCALE.value,
        new_rate_scale=_NEW_SCALE.value, slo_scale=_SLO_SCALE.value, max_model_len=_MAXLEN.value,
        nodes=_NODES.value, gpus_per_node=_GPUS.value, gpu_memory_gib=_MEM.value)
    from fineserve_jax.scheduler.footprint import GiB
    from fineserve_jax.scheduler.placement import PlacementConfig, PlacementError, place, replan
    from fineserve_jax.sim.fleets import get_fleet
    from fineserve_jax.scheduler.cost import load_cost_model

    cost = load_cost_model()
    fleet = get_fleet(_FLEET.value).scaled(_RATE_SCALE.value)
    over = {k: v for k, v in (("nodes", _NODES.value), ("gpus_per_node", _GPUS.value),
                              ("gpu_memory_bytes", int(_MEM.value * GiB))) if v}
    if over:
        fleet = fleet.with_cluster(**over)
    cfg = PlacementConfig(max_model_len=_MAXLEN.value, slo_scale=_SLO_SCALE.value)
    os.makedirs(_OUT.value, exist_ok=True)
    print(f"fleet {fleet.name}: {fleet.description}; total {fleet.total_rate:.1f} req/s")
    totals = {}
    for policy in _POLICIES.value:
        t0 = time.perf_counter()
        try:
            plan = place(fleet.models, fleet.cluster, cost, policy, cfg)
        except PlacementError as e:
            print(f"\n{policy}: no placement: {e}")
            totals[policy] = {"error": str(e), "model": e.model}
            continue
        dt = time.perf_counter() - t0
        plan.save(os.path.join(_OUT.value, f"plan_{policy}.json"))
        est = plan.estimates
        totals[policy] = {"devices": len(plan.devices), "gpus": plan.gpus_used,
                          "predicted_tokens_per_s": est["tokens_per_s"],
                          "predicted_goodput_tokens_per_s": est["goodput_tokens_per_s"],
                          "placement_s": dt}
        print()
        print(plan.describe())
        print(f"  predicted: {est['tokens_per_s']:.0f} output tok/s, {est['goodput_tokens_per_s']:.0f} "
              f"within SLO; {est.get('partitions_evaluated', 1)} partition(s) evaluated in {dt:.2f} s")
        if _NEW_SCALE.value > 0:
            new = fleet.scaled(_NEW_SCALE.value / _RATE_SCALE.value)
            try:
                r = replan(plan, new.models, cost, cfg)
            except PlacementError as e:
                print(f"  re-placement at rates x{_NEW_SCALE.value}: no placement: {e}")
                totals[policy]["replan"] = {"error": str(e), "model": e.model}
                continue
            print(f"  re-placement at rates x{_NEW_SCALE.value}: "
                  + ("the plan holds (rates updated)" if r.kept else
                     f"placed again; moved: {', '.join(r.moved) or 'none'}"))
            r.plan.save(os.path.join(_OUT.value, f"plan_{policy}_rescaled.json"))
            totals[policy]["replan"] = {"kept": r.kept, "moved": list(r.moved)}
    with open(os.path.join(_OUT.value, "placement.json"), "w") as f:
        json.dump({"fleet": fleet.name, "rate_scale": _RATE_SCALE.value, "policies": totals}, f, indent=2)
    print(f"\nwrote {_OUT.value}/plan_<policy>.json and placement.json")


if __name__ == "__main__":
    app.run(main)

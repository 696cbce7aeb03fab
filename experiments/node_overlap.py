"""Do a node's device groups overlap? One thread per engine vs the same shares one after the
other.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python -m experiments.node_overlap --output_dir=runs/node_overlap

Serves a burst (every request queued at the start, so each group is busy until its share is
done) on every device group of node --node of --plan (default: a tiny tp2 + 2 x tp1 plan),
twice: with the node's threads (`NodeServer.serve`), and each group's share alone, one group
after another. Prints and writes (overlap.json) the wall times, the summed step times, and
overlap = summed step time / wall time (above 1: steps of different groups ran at once).
"""

from __future__ import annotations

import time

from absl import app, flags

from experiments.output import write_json

_PLAN = flags.DEFINE_string("plan", None, "placement plan (default: a tiny tp2 + 2 x tp1 node)")
_NODE = flags.DEFINE_integer("node", 0, "which node of the plan")
_NUM = flags.DEFINE_integer("num_requests", 96, "requests in the burst")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 24, "output tokens per request")
_PROMPT = flags.DEFINE_integer("prompt_len", 24, "prompt tokens per request")
_OUT = flags.DEFINE_string("output_dir", "runs/node_overlap", "where overlap.json goes")


def demo_plan():
    from fineserve_jax.scheduler.footprint import footprint
    from fineserve_jax.scheduler.plan import ClusterSpec, DevicePlan, PlacedModel, PlacementPlan

    def m(name, config, preset):
        fp = footprint(config, preset, 4)
        return PlacedModel(name, config, preset, 10.0, None, fp.weight_bytes, fp.min_kv_bytes(128))

    return PlacementPlan(
        ClusterSpec(1, 4, 1 << 30, 0.9, "cpu"),
        (DevicePlan(0, (0, 1), (m("chat", "tiny-llama", "org"),), 1 << 19),
         DevicePlan(1, (2,), (m("code", "tiny-mistral", "fp8_kv8"),), 1 << 18),
         DevicePlan(2, (3,), (m("code", "tiny-mistral", "fp8_kv8"),
                              m("small", "tiny-qwen2", "int8_kv8")), 1 << 18)),
        "manual", max_model_len=128, tokens_per_block=4)


def main(argv):
    del argv
    from fineserve_jax.cluster.node import NodeServer
    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.core.request import Request
    from fineserve_jax.core.sampling_params import SamplingParams
    from fineserve_jax.scheduler.local import SchedulerConfig
    from fineserve_jax.scheduler.plan import PlacementPlan

    plan = PlacementPlan.load(_PLAN.value) if _PLAN.value else demo_plan()
    server = NodeServer(plan, _NODE.value, engine_kwargs=dict(
        buckets=Buckets(decode_sizes=(8, 16), prefill_sizes=(64,)), max_model_len=128,
        tokens_per_block=4, slab_target_bytes=1, compilation_cache_dir=None,
        scheduler=SchedulerConfig(admission="fcfs", execution="fcfs", drop=False)))
    names = server.scope.model_names
    sp = SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=0.0, ignore_eos=True)
    def burst(first_id, n):  # request ids are unique over an engine's life
        return [Request(model=names[i % len(names)], request_id=first_id + i, sampling=sp,
                        arrival_s=0.0,
                        prompt=[1] + [3 + (11 * i + j) % 250 for j in range(_PROMPT.value - 1)])
                for i in range(n)]

    server.serve(burst(10 ** 6, len(names) * 2))  # warm the host paths once (not timed)
    reqs = burst(0, _NUM.value)
    busy0 = {d: e.loop.stats.busy_s for d, e in server.engines.items()}
    res = server.serve(reqs)
    threaded = {"wall_s": res.wall_s, "busy_s": res.busy_s - sum(busy0.values()),
                "finished": sum(e.output.status == "finished" for e in res.ended)}
    threaded["overlap"] = threaded["busy_s"] / threaded["wall_s"]
    per, _ = server.route(burst(2 * 10 ** 6, _NUM.value))  # the same shares, new ids
    seq = {"wall_s": 0.0, "busy_s": 0.0, "devices": {}}
    for d, e in server.engines.items():
        b0 = e.loop.stats.busy_s
        t0 = time.perf_counter()
        outs = e.run(per[d], realtime=False)
        wall = time.perf_counter() - t0
        seq["devices"][d] = {"requests": len(per[d]), "wall_s": wall,
                             "busy_s": e.loop.stats.busy_s - b0,
                             "finished": sum(o.status == "finished" for o in outs)}
        seq["wall_s"] += wall
        seq["busy_s"] += e.loop.stats.busy_s - b0
    assert threaded["finished"] == _NUM.value == sum(v["finished"] for v in seq["devices"].values())
    out = {"devices": {d.id: {"tp": d.tp, "models": [m.name for m in d.models],
                              "requests": len(per[d.id])} for d in server.devices},
           "threaded": threaded, "sequential": seq,
           "speedup": seq["wall_s"] / threaded["wall_s"]}
    print(f"{len(reqs)} requests x {_MAX_TOKENS.value} tokens on {len(server.engines)} groups: "
          f"threads {threaded['wall_s']:.2f} s (summed step time {threaded['busy_s']:.2f} s, "
          f"overlap {threaded['overlap']:.2f}x); one after another {seq['wall_s']:.2f} s "
          f"(summed step time {seq['busy_s']:.2f} s): speedup {out['speedup']:.2f}x")
    write_json(_OUT.value, "overlap.json", out)


if __name__ == "__main__":
    app.run(main)

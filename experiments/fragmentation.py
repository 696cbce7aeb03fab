"""KV memory fragmentation: one slab arena vs static pools, same arena bytes, same workload.

A seeded mixed workload of three models of different precisions and depths
(Llama-3.1-8B bf16 KV, Llama-3.1-8B fp8 KV, Qwen2.5-32B int4 KV) whose request rates shift
between the models over time (sinusoids 120 degrees apart), with ShareGPT-like lognormal
prompt/output lengths, is replayed as a discrete-time simulation against three memory
managers of the same byte size, all built from `SlabAllocator`:

  slab_arena     one arena, slabs formatted per KV format on demand (this design).
  per_model      static per-model partitions sized by each model's mean KV demand
                 (vLLM / MuxServe without adaptation); one SlabAllocator per partition with
                 slab = block, so no slab granularity is lost there.
  per_depth      the reference FineServe code: one static pool per distinct layer count,
                 sized by mean demand; formats of the same depth share slabs inside it.
  (slab_arena+compaction with --compact_every > 0: the arena plus periodic compaction.)

The memory managers are configurations of the engine's own device loop
(`fineserve_jax.core.loop`, the code that serves and that the simulator runs), not a second
simulator: the same submission rule (a request that could never fit its pool fails at once),
FCFS admission in strict order within a pool with `--watermark` of the pool kept free, the
same preemption (the latest-admitted request of the pool is recomputed), the same compaction
(`--compact_every` steps while requests wait). A fixed-cost executor runs the steps
(round-robin over the models, every prefill or decode step 1/3 tick), so one tick is one
round of every model's step and a running request decodes about one token per tick. Arrivals
stop at `--ticks`; the run continues until every request has ended.

    python -m experiments.fragmentation [--output_dir=runs/fragmentation] [--seed=0]

Writes `fragmentation.json` (config, command, per-manager metrics) and `fragmentation.png`.
Token counts are tokens; times are ticks; byte fractions are time means over the arrival
window (drain excluded) divided by the arena bytes, or by the mean bytes held by live blocks.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import sys
from typing import List, Sequence

import numpy as np
from absl import app, flags

from fineserve_jax.core.clock import VirtualClock
from fineserve_jax.core.executor import FixedCostExecutor
from fineserve_jax.core.loop import DeviceLoop, LoopConfig
from fineserve_jax.core.model_entry import ModelEntry, ModelLimits
from fineserve_jax.core.request import Request
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.formats import KVFormat
from fineserve_jax.kvslab import SlabAllocator, device_slab_bytes, num_slabs_for_arena
from fineserve_jax.scheduler.local import LocalScheduler, SchedulerConfig
from models.presets import get_model_config

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/fragmentation", "Where to write JSON and PNG.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_integer("ticks", 12000, "Ticks (engine iterations) with arrivals.")
flags.DEFINE_integer("period_ticks", 4000, "Period of the per-model load shift.")
flags.DEFINE_float("amplitude", 0.8, "Per-model rate = mean * (1 + amplitude * sin(...)).")
flags.DEFINE_float("load", 0.8, "Mean offered KV byte demand as a fraction of the arena.")
flags.DEFINE_float("arena_gib", 24.0, "KV arena size (GiB), the same for every manager.")
flags.DEFINE_integer("tokens_per_block", 16, "Tokens per KV block.")
flags.DEFINE_float("prompt_mean", 161.0, "Mean prompt tokens (lognormal, ShareGPT-like).")
flags.DEFINE_float("output_mean", 338.0, "Mean output tokens (lognormal, ShareGPT-like).")
flags.DEFINE_float("prompt_sigma", 1.0, "Lognormal sigma of prompt lengths.")
flags.DEFINE_float("output_sigma", 0.8, "Lognormal sigma of output lengths.")
flags.DEFINE_integer("max_tokens", 4096, "Cap on prompt + output tokens of a request.")
flags.DEFINE_float("target_slab_mib", 64.0, "Target slab size for choose_slab_bytes (MiB).")
flags.DEFINE_float("watermark", 0.01, "Fraction of a pool kept free at admission.")
flags.DEFINE_integer("compact_every", 10, "If > 0, also run the arena with compaction every N "
                     "ticks (budget --compact_max_moves blocks); 0: three managers only.")
flags.DEFINE_integer("compact_max_moves", 256, "Block moves per compaction.")
flags.DEFINE_integer("sample_every", 1, "Sample the time series every this many ticks.")

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One served model: its name, KV format, and its share of the request rate."""

    name: str
    fmt: KVFormat
    rate_weight: float = 1.0

    @property
    def block_bytes(self) -> int:
        return self.fmt.block_bytes


def default_models(tokens_per_block: int = 16) -> List[ModelSpec]:
    def spec(preset, kv_dtype):
        c = get_model_config(preset)
        fmt = KVFormat(c.num_layers, c.num_kv_heads, c.head_dim, kv_dtype,
                       tokens_per_block=tokens_per_block)
        return ModelSpec(f"{preset}/{kv_dtype}", fmt)

    return [spec("llama-3.1-8b", "bf16"), spec("llama-3.1-8b", "fp8"),
            spec("qwen2.5-32b", "int4")]


# --- workload -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    ticks: int = 12000
    period_ticks: int = 4000
    amplitude: float = 0.8
    load: float = 0.8
    prompt_mean: float = 161.0
    output_mean: float = 338.0
    prompt_sigma: float = 1.0
    output_sigma: float = 0.8
    max_tokens: int = 4096
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival: int64 arrays [num_requests]; rates: [models, ticks]."""

    model: np.ndarray
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    rates: np.ndarray  # offered requests per tick, per model
    demand_bytes: np.ndarray  # [models] expected mean KV bytes held (Little's law)


def sample_lengths(rng, n, cfg: WorkloadConfig):
    """(prompt, output) int64 [n]: lognormal with the configured means, clipped."""
    def lognormal(mean, sigma, lo, hi):
        mu = np.log(mean) - sigma**2 / 2
        return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(np.int64)

    prompt = lognormal(cfg.prompt_mean, cfg.prompt_sigma, 1, cfg.max_tokens // 2)
    output = lognormal(cfg.output_mean, cfg.output_sigma, 2, cfg.max_tokens // 2)
    return prompt, output


def block_ticks(prompt: np.ndarray, output: np.ndarray, tokens_per_block: int) -> np.ndarray:
    """Sum over a request's running ticks of the blocks it holds (float64 [n]).

    It holds L = prompt .. prompt + output - 1 tokens, one tick each, in ceil(L / T) blocks.
    Uses F(n) = sum_{L=1..n} ceil(L/T) = T q (q+1) / 2 + r (q+1), n = q T + r.
    """
    def F(n):
        q, r = np.divmod(n, tokens_per_block)
        return tokens_per_block * q * (q + 1) / 2 + r * (q + 1)

    return F(prompt + output - 1) - F(prompt - 1)


def make_workload(models: Sequence[ModelSpec], arena_bytes: int, cfg: WorkloadConfig,
                  tokens_per_block: int) -> Workload:
    """Poisson arrivals with sinusoidal per-model rates; the mean total KV demand (by Little's
    law: rate x expected block-ticks x block bytes) is `cfg.load * arena_bytes`."""
    rng = np.random.default_rng(cfg.seed)
    # Expected KV demand per request, from an independent sample (the operator's profile).
    p, o = sample_lengths(np.random.default_rng(cfg.seed + 10_000), 200_000, cfg)
    per_request = np.array([block_ticks(p, o, tokens_per_block).mean() * m.block_bytes
                            for m in models])
    w = np.array([m.rate_weight for m in models], dtype=np.float64)
    base = cfg.load * arena_bytes / float(np.sum(w * per_request))  # requests per tick
    t = np.arange(cfg.ticks)
    phase = 2 * np.pi * np.arange(len(models))[:, None] / len(models)
    rates = base * w[:, None] * (1 + cfg.amplitude * np.sin(2 * np.pi * t / cfg.period_ticks
                                                             + phase))
    counts = rng.poisson(np.maximum(rates, 0))
    # counts.T is [ticks, models]: arrivals ordered by tick, then model.
    model = np.repeat(np.tile(np.arange(len(models)), cfg.ticks), counts.T.ravel())
    arrival = np.repeat(t, counts.sum(axis=0))
    # Random order among the arrivals of one tick.
    order = np.lexsort((rng.random(len(arrival)), arrival))
    prompt, output = sample_lengths(rng, len(arrival), cfg)
    return Workload(model[order].astype(np.int64), arrival[order].astype(np.int64), prompt,
                    output, rates, base * w * per_request)


# --- memory managers ------------------------------------------------------------------------


@dataclasses.dataclass
class Pool:
    """One static share of the arena: an allocator serving some models."""

    name: str
    models: tuple
    alloc: SlabAllocator
    budget_bytes: int


@dataclasses.dataclass
class Manager:
    """A KV memory configuration of the device loop: its pools (one shared arena, or static
    shares) and whether the loop compacts slabs."""

    name: str
    pools: List[Pool]
    pool_of: List[int]  # model index -> pool index
    arena_bytes: int
    compact_every: int = 0
    compact_max_moves: int = 0

    @property
    def unusable_bytes(self) -> int:
        """Null slabs plus pool bytes too small for a whole slab."""
        return self.arena_bytes - sum(
            p.alloc.total_bytes - p.alloc.slab_bytes for p in self.pools)


def build_manager(name: str, groups: Sequence[Sequence[int]], models: Sequence[ModelSpec],
                  demand_bytes: np.ndarray, arena_bytes: int, target_slab_bytes: int,
                  **extra) -> Manager:
    """Split the arena among `groups` of models by their mean demand; one SlabAllocator per
    group, its slab size the device arena's rule (`device_slab_bytes`: a common multiple of
    the group's block sizes, for a single format the block scaled to near the target)."""
    total = float(sum(demand_bytes[m] for g in groups for m in g))
    pools, pool_of = [], [0] * len(models)
    for gi, g in enumerate(groups):
        budget = int(arena_bytes * sum(demand_bytes[m] for m in g) / total)
        blocks = [models[m].block_bytes for m in g]
        slab = device_slab_bytes(blocks, target_slab_bytes) if len(g) > 1 else blocks[0]
        alloc = SlabAllocator(num_slabs_for_arena(budget, slab), slab)
        pools.append(Pool("+".join(models[m].name for m in g), tuple(g), alloc, budget))
        for m in g:
            pool_of[m] = gi
    return Manager(name, pools, pool_of, arena_bytes, **extra)


def standard_managers(models: Sequence[ModelSpec], demand_bytes, arena_bytes: int,
                      target_slab_bytes: int, compact_every: int = 0,
                      compact_max_moves: int = 256) -> List[Manager]:
    everyone = [list(range(len(models)))]
    depths = sorted({m.fmt.num_layers for m in models})
    by_depth = [[i for i, m in enumerate(models) if m.fmt.num_layers == d] for d in depths]
    out = [
        build_manager("slab_arena", everyone, models, demand_bytes, arena_bytes,
                      target_slab_bytes),
        build_manager("per_model", [[i] for i in range(len(models))], models, demand_bytes,
                      arena_bytes, target_slab_bytes),
        build_manager("per_depth", by_depth, models, demand_bytes, arena_bytes,
                      target_slab_bytes),
    ]
    if compact_every > 0:
        out.append(build_manager("slab_arena+compaction", everyone, models, demand_bytes,
                                 arena_bytes, target_slab_bytes, compact_every=compact_every,
                                 compact_max_moves=compact_max_moves))
    return out


# --- simulation: the device loop ---------------------------------------------------------------


def device_loop(manager: Manager, models: Sequence[ModelSpec], tokens_per_block: int,
                max_tokens: int, watermark: float):
    """The engine's device loop over this manager's pools: FCFS admission (strict order
    within a pool, `watermark` of a pool kept free), round-robin steps over the models, and
    a fixed-cost executor whose every step takes 1 / (number of models) ticks, so that a
    round of all models' decode steps is one tick."""
    big = 1 << 20  # step limits never bind: every running request decodes in its model's step
    entries = {m.name: ModelEntry(m.name, m.fmt.kv_dtype, m.block_bytes, tokens_per_block,
                                  ModelLimits(big, big, big), max_len=max_tokens + 1)
               for m in models}
    pools = [manager.pools[manager.pool_of[i]].alloc for i in range(len(models))]
    shared = len(manager.pools) == 1
    sched = LocalScheduler(
        entries, pools[0] if shared else None, _NoCost(),
        SchedulerConfig(admission="fcfs", execution="round_robin", drop=False, watermark=watermark),
        allocators=None if shared else {m.name: a for m, a in zip(models, pools)})
    tick = 1.0 / len(models)
    executor = FixedCostExecutor(prefill_s=tick, prefill_s_per_token=0.0, decode_s=tick)
    return DeviceLoop(sched, executor, VirtualClock(),
                      config=LoopConfig(manager.compact_every, manager.compact_max_moves or 1,
                                        kv_sample_interval_s=1.0))


class _NoCost:
    """FCFS admission and round-robin execution never ask for step times."""

    def observe(self, *args) -> None:
        pass


def simulate(manager: Manager, models: Sequence[ModelSpec], wl: Workload, horizon: int,
             tokens_per_block: int, watermark: float, max_tokens: int = 4096,
             sample_every: int = 1) -> dict:
    """Replay the workload through the device loop with one manager; returns metrics and
    per-tick series (sampled every `sample_every` ticks)."""
    loop = device_loop(manager, models, tokens_per_block, max_tokens, watermark)
    sched = loop.scheduler
    names = [m.name for m in models]
    index = {n: i for i, n in enumerate(names)}
    B = [m.block_bytes for m in models]
    bpt = [m.fmt.bytes_per_token for m in models]
    reqs = [Request(names[int(wl.model[i])], [7] * int(wl.prompt[i]),
                    SamplingParams(max_tokens=int(wl.output[i]), ignore_eos=True),
                    arrival_s=float(wl.arrival[i]), request_id=i) for i in range(len(wl.model))]
    n_samples = -(-horizon // sample_every)
    series = {k: np.zeros(n_samples) for k in ("tokens", "used", "tail", "free_in_slabs",
                                               "partial_block", "waiting", "running")}
    per_model_tokens = np.zeros((len(models), n_samples))
    per_model_formatted = np.zeros((len(models), n_samples))
    next_sample = [0]

    def sample(lp) -> None:
        t = lp.clock.now()
        while next_sample[0] * sample_every <= t and next_sample[0] < n_samples:
            k = next_sample[0]
            tok = [0] * len(models)
            for m, seqs in sched.running.items():
                # Tokens whose KV is in the arena or reserved for the prefill under way.
                tok[index[m]] = sum(s.num_computed + s.num_pending_prefill for s in seqs)
            used = tail = free_in = 0
            for pool in manager.pools:
                w = pool.alloc.waste_bytes()
                used += pool.alloc.used_bytes
                tail += w["slab_tail"]
                free_in += w["free_in_partial_slabs"]
            series["tokens"][k] = sum(tok)
            series["used"][k] = used
            series["tail"][k] = tail
            series["free_in_slabs"][k] = free_in
            series["waiting"][k] = len(sched.waiting)
            series["running"][k] = sched.num_running
            per_model_tokens[:, k] = tok
            for m in range(len(models)):
                a = manager.pools[manager.pool_of[m]].alloc
                per_model_formatted[m, k] = a.formatted_slabs(B[m]) * a.slab_bytes
            series["partial_block"][k] = used - sum(tok[m] * bpt[m] for m in range(len(models)))
            next_sample[0] += 1

    states = loop.run(reqs, realtime=True, on_iteration=sample)
    series["per_model_tokens"] = per_model_tokens
    series["per_model_formatted"] = per_model_formatted
    return _metrics(manager, models, states, series, loop)


def _metrics(manager, models, states, series, loop) -> dict:
    arena = manager.arena_bytes
    used_mean = float(series["used"].mean())
    waiting = series["waiting"] > 0
    delays = np.array([s.first_admitted_s - s.arrival_s for s in states
                       if s.first_admitted_s is not None])
    waste = {}
    for key, name in (("partial_block", "partial_last_block"), ("free_in_slabs",
                      "free_in_partial_slabs"), ("tail", "slab_tail")):
        mean = float(series[key].mean())
        waste[name] = {"frac_of_arena": mean / arena, "frac_of_used": mean / max(used_mean, 1)}
    total = sum(float(series[k].mean()) for k in ("partial_block", "free_in_slabs", "tail"))
    waste["total"] = {"frac_of_arena": total / arena, "frac_of_used": total / max(used_mean, 1)}
    ends = collections.Counter(s.status.value for s in states)
    st = loop.stats
    return {
        "manager": manager.name,
        "pools": [{"name": p.name, "models": [models[m].name for m in p.models],
                   "slab_bytes": p.alloc.slab_bytes, "num_slabs": p.alloc.num_slabs,
                   "budget_bytes": p.budget_bytes}
                  for p in manager.pools],
        "unusable_bytes_frac": manager.unusable_bytes / arena,
        "peak_kv_tokens": int(series["tokens"].max()),
        "mean_kv_tokens": float(series["tokens"].mean()),
        # A capacity measure: tokens held in the ticks where some request waits for memory.
        "mean_kv_tokens_while_waiting": float(series["tokens"][waiting].mean())
        if waiting.any() else 0.0,
        "ticks_with_waiting_frac": float(waiting.mean()),
        "mean_kv_tokens_per_model": {m.name: float(series["per_model_tokens"][i].mean())
                                     for i, m in enumerate(models)},
        "mean_used_frac": used_mean / arena,
        "peak_used_frac": float(series["used"].max()) / arena,
        "requests": len(states),
        "finished": ends["finished"],
        "rejected": ends["failed"],
        "ended_once": sum(ends.values()) == len(states) and len(loop.ended) == len(states),
        "waited": int(np.sum(delays >= 1.0)),  # at least one tick (a round of steps)
        "preempted_requests": sum(1 for s in states if s.preemptions),
        "preemption_events": loop.scheduler.num_preemptions,
        "queue_delay_mean_ticks": float(delays.mean()) if len(delays) else 0.0,
        "queue_delay_p99_ticks": float(np.percentile(delays, 99)) if len(delays) else 0.0,
        "mean_waiting": float(series["waiting"].mean()),
        "mean_running": float(series["running"].mean()),
        "total_ticks": float(loop.clock.now()),
        "steps": st.steps,
        "compactions": st.compaction_runs,
        "compaction_moved_blocks": st.moved_blocks,
        "compaction_moved_bytes_per_tick": st.moved_bytes / max(loop.clock.now(), 1.0),
        "waste": waste,
        "_series": series,
    }


# --- driver ----------------------------------------------------------------------------------


def run(cfg: WorkloadConfig, arena_bytes: int, tokens_per_block: int = 16,
        target_slab_bytes: int = 64 << 20, watermark: float = 0.01, compact_every: int = 0,
        compact_max_moves: int = 256, sample_every: int = 1) -> dict:
    """The whole experiment; returns the JSON-ready result (series under "_series" keys)."""
    models = default_models(tokens_per_block)
    wl = make_workload(models, arena_bytes, cfg, tokens_per_block)
    managers = standard_managers(models, wl.demand_bytes, arena_bytes, target_slab_bytes,
                                 compact_every, compact_max_moves)
    results = [simulate(mgr, models, wl, cfg.ticks, tokens_per_block, watermark,
                        cfg.max_tokens, sample_every) for mgr in managers]
    by = {r["manager"]: r for r in results}
    ratios = {}
    for name in ("slab_arena", "slab_arena+compaction"):
        if name not in by:
            continue
        for base in ("per_model", "per_depth"):
            for what in ("peak", "mean"):
                key = f"{what}_kv_tokens"
                ratios[f"{name}/{base}/{what}_tokens"] = by[name][key] / by[base][key]
    return {
        "config": {**dataclasses.asdict(cfg), "arena_bytes": arena_bytes,
                   "tokens_per_block": tokens_per_block, "target_slab_bytes": target_slab_bytes,
                   "watermark": watermark, "compact_every": compact_every,
                   "compact_max_moves": compact_max_moves, "sample_every": sample_every},
        "models": [{"name": m.name, "block_bytes": m.block_bytes,
                    "bytes_per_token": m.fmt.bytes_per_token, "num_layers": m.fmt.num_layers,
                    "kv_dtype": m.fmt.kv_dtype} for m in models],
        "workload": {
            "requests": int(len(wl.model)),
            "requests_per_model": np.bincount(wl.model, minlength=len(models)).tolist(),
            "mean_prompt": float(wl.prompt.mean()), "mean_output": float(wl.output.mean()),
            "mean_demand_frac_per_model": (wl.demand_bytes / arena_bytes).tolist(),
            "_rates": wl.rates,
        },
        "results": results,
        "ratios": ratios,
    }


def strip_series(obj):
    """The result without its numpy series (keys starting with "_"), for JSON."""
    if isinstance(obj, dict):
        return {k: strip_series(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [strip_series(v) for v in obj]
    return obj


def format_table(result: dict) -> str:
    cols = [("peak tok", lambda r: f"{r['peak_kv_tokens']:,}"),
            ("mean tok", lambda r: f"{r['mean_kv_tokens']:,.0f}"),
            ("tok|wait", lambda r: f"{r['mean_kv_tokens_while_waiting']:,.0f}"),
            ("used%", lambda r: f"{100 * r['mean_used_frac']:.1f}"),
            ("running", lambda r: f"{r['mean_running']:.0f}"),
            ("waited", lambda r: f"{r['waited']}"),
            ("preempt", lambda r: f"{r['preempted_requests']}/{r['preemption_events']}"),
            ("delay mean", lambda r: f"{r['queue_delay_mean_ticks']:.0f}"),
            ("delay p99", lambda r: f"{r['queue_delay_p99_ticks']:.0f}"),
            ("waste%used", lambda r: f"{100 * r['waste']['total']['frac_of_used']:.2f}"),
            ("waste%arena", lambda r: f"{100 * r['waste']['total']['frac_of_arena']:.2f}"),
            ("(blk/slab/tail)%used", lambda r: "/".join(
                f"{100 * r['waste'][k]['frac_of_used']:.2f}"
                for k in ("partial_last_block", "free_in_partial_slabs", "slab_tail"))),
            ("unusable%", lambda r: f"{100 * r['unusable_bytes_frac']:.2f}")]
    rows = [["manager"] + [c for c, _ in cols]]
    for r in result["results"]:
        rows.append([r["manager"]] + [f(r) for _, f in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]
    ratios = result["ratios"]
    for name in ("slab_arena", "slab_arena+compaction"):
        if f"{name}/per_model/peak_tokens" not in ratios:
            continue
        r = {k.split("/", 1)[1]: v for k, v in ratios.items() if k.startswith(name + "/")}
        lines.append(
            f"{name} KV tokens held, peak (mean): {r['per_model/peak_tokens']:.2f}x "
            f"({r['per_model/mean_tokens']:.2f}x) per_model, {r['per_depth/peak_tokens']:.2f}x "
            f"({r['per_depth/mean_tokens']:.2f}x) per_depth")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    rates = result["workload"]["_rates"]
    for m, name in enumerate(r["name"] for r in result["models"]):
        axes[0].plot(rates[m], label=name)
    axes[0].set_ylabel("offered req / tick")
    axes[0].legend(fontsize=8)
    for r in result["results"]:
        s = r["_series"]
        axes[1].plot(s["tokens"], label=r["manager"], lw=0.8)
        axes[2].plot(s["waiting"], label=r["manager"], lw=0.8)
    axes[1].set_ylabel("KV tokens held")
    axes[2].set_ylabel("requests waiting")
    for r in result["results"]:
        if not r["manager"].startswith("slab_arena"):
            continue
        style = "--" if "compaction" in r["manager"] else "-"
        for m, name in enumerate(x["name"] for x in result["models"]):
            axes[3].plot(r["_series"]["per_model_formatted"][m] / GiB, style, lw=0.8,
                         color=f"C{m}", label=f"{r['manager']}: {name}")
    axes[3].set_ylabel("slab arena GiB\nformatted per format")
    axes[3].legend(fontsize=7)
    axes[3].set_xlabel("tick (engine iteration)")
    axes[1].legend(fontsize=8)
    fig.suptitle("KV slab arena vs static pools (same arena bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    cfg = WorkloadConfig(ticks=FLAGS.ticks, period_ticks=FLAGS.period_ticks,
                         amplitude=FLAGS.amplitude, load=FLAGS.load,
                         prompt_mean=FLAGS.prompt_mean, output_mean=FLAGS.output_mean,
                         prompt_sigma=FLAGS.prompt_sigma, output_sigma=FLAGS.output_sigma,
                         max_tokens=FLAGS.max_tokens, seed=FLAGS.seed)
    result = run(cfg, int(FLAGS.arena_gib * GiB), FLAGS.tokens_per_block,
                 int(FLAGS.target_slab_mib * (1 << 20)), FLAGS.watermark, FLAGS.compact_every,
                 FLAGS.compact_max_moves, FLAGS.sample_every)
    result["command"] = " ".join(["python -m experiments.fragmentation"] + sys.argv[1:])
    result["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    print(format_table(result))
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "fragmentation.json"), "w") as f:
        json.dump(strip_series(result), f, indent=2)
    plot(result, os.path.join(FLAGS.output_dir, "fragmentation.png"))
    print(f"wrote {FLAGS.output_dir}/fragmentation.json and fragmentation.png")


if __name__ == "__main__":
    app.run(main)

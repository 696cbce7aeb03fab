"""Flag checks of the simulator and placement scripts: nonsense values are refused with an
`absl.app.UsageError` that names the flag, before any work (no trace parsing, no workload,
no placement). The scripts pass their flag values in; this module defines no flags itself, so
tests (and scripts) can import it alongside any script.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

from absl import app

# Requests the simulator may hold at once by default. Measured 2026-12-01 on the 2-core CPU dev
# box: ~6.9 KB of resident memory per simulated request (pair8b, 20,000 requests: 237 MB peak
# vs 114 MB for 2,000), ~1.4 ms of simulation each; 1M requests ~ 7 GB and ~25 min.
DEFAULT_MAX_WORKLOAD_REQUESTS = 1_000_000
SIM_BYTES_PER_REQUEST = 6.9e3
MAX_GPU_MEMORY_GIB = float(1 << 20)  # 1 PiB per GPU: anything above is a typo


def usage(flag: str, msg: str) -> app.UsageError:
    return app.UsageError(f"--{flag}: {msg}")


def number(flag: str, value, *, lo: float = -math.inf, lo_open: bool = False,
           hi: float = math.inf, optional: bool = False) -> Optional[float]:
    """A finite number in [lo, hi] ((lo, hi] with lo_open); None passes when `optional`."""
    if value is None and optional:
        return None
    bound = (f"> {lo:g}" if lo_open else f">= {lo:g}") if lo > -math.inf else ""
    if hi < math.inf:
        bound += f"{' and ' if bound else ''}<= {hi:g}"
    want = f"a finite number{' ' + bound if bound else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise usage(flag, f"must be {want}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
        raise usage(flag, f"must be {want}, got {value!r}")
    return v


def integer(flag: str, value, *, lo: int, hi: Optional[int] = None, optional: bool = False,
            meaning: str = "") -> Optional[int]:
    """An int in [lo, hi]; `meaning` explains special values in the message (e.g. 0: off)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise usage(flag, f"must be an integer {rng}{' (' + meaning + ')' if meaning else ''}, "
                    f"got {value!r}")
    return value


def one_of(flag: str, values: Iterable[str], valid: Sequence[str], allow_empty: bool = False) -> None:
    values = list(values)
    if not values and not allow_empty:
        raise usage(flag, f"needs at least one of {', '.join(valid)}")
    unknown = [v for v in values if v not in valid]
    if unknown:
        raise usage(flag, f"unknown {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")


def cluster_overrides(nodes, gpus_per_node, gpu_memory_gib) -> None:
    integer("nodes", nodes, lo=0, meaning="0: the fleet's")
    integer("gpus_per_node", gpus_per_node, lo=0, meaning="0: the fleet's")
    number("gpu_memory_gib", gpu_memory_gib, lo=0.0, hi=MAX_GPU_MEMORY_GIB)


def placement_knobs(slo_scale, max_model_len) -> None:
    number("slo_scale", slo_scale, lo=0.0, lo_open=True)
    integer("max_model_len", max_model_len, lo=1, optional=True)


def fleet_named(name: str):
    from fineserve_jax.sim.fleets import fleet_names, get_fleet

    if name not in fleet_names():
        raise usage("fleet", f"unknown fleet {name!r}; valid: {', '.join(fleet_names())}")
    return get_fleet(name)


def check_placement_flags(*, fleet, policies, rate_scale, new_rate_scale, slo_scale,
                          max_model_len, nodes, gpus_per_node, gpu_memory_gib) -> None:
    """`experiments.placement`'s flags."""
    from fineserve_jax.scheduler.placement import POLICIES

    fleet_named(fleet)
    one_of("policies", policies, POLICIES)
    number("rate_scale", rate_scale, lo=0.0, lo_open=True)
    number("new_rate_scale", new_rate_scale, lo=0.0)  # 0: no re-placement
    placement_knobs(slo_scale, max_model_len)
    cluster_overrides(nodes, gpus_per_node, gpu_memory_gib)


def check_simulate_flags(*, fleet, system, rate_scale, duration_s, num_requests, cv, trace,
                         trace_start_s, trace_time_scale, trace_target_rate, slo_scale,
                         max_model_len, nodes, gpus_per_node, gpu_memory_gib, workers,
                         max_workload_requests) -> None:
    """`experiments.simulate`'s flags, including whether a synthetic workload fits in memory
    (estimated as the fleet's total rate x --rate_scale x --duration_s, before generating)."""
    from fineserve_jax.sim import get_system

    f = fleet_named(fleet)
    try:
        get_system(system)
    except ValueError as e:
        raise usage("system", str(e)) from None
    number("rate_scale", rate_scale, lo=0.0, lo_open=True)
    duration = number("duration_s", duration_s, lo=0.0, lo_open=True, optional=True)
    integer("num_requests", num_requests, lo=0, meaning="0: set by --duration_s")
    number("cv", cv, lo=0.0, lo_open=True)
    placement_knobs(slo_scale, max_model_len)
    cluster_overrides(nodes, gpus_per_node, gpu_memory_gib)
    integer("workers", workers, lo=0, meaning="0: all CPUs")
    cap = integer("max_workload_requests", max_workload_requests, lo=1)
    if num_requests > cap:
        raise usage("num_requests", f"{num_requests} requests is more than "
                    f"--max_workload_requests={cap} ({_memory(num_requests)}); raise that flag "
                    f"if the machine has the memory")
    if trace:
        number("trace_start_s", trace_start_s, lo=0.0)
        number("trace_time_scale", trace_time_scale, lo=0.0, lo_open=True, optional=True)
        number("trace_target_rate", trace_target_rate, lo=0.0, lo_open=True, optional=True)
        if trace_time_scale is not None and trace_target_rate is not None:
            raise usage("trace_target_rate", "give at most one of --trace_time_scale and "
                        "--trace_target_rate")
        return  # the trace's size is checked once it is read (check_trace_window)
    for flag, value in (("trace_start_s", trace_start_s or None), ("trace_time_scale", trace_time_scale),
                        ("trace_target_rate", trace_target_rate)):
        if value is not None:
            raise usage(flag, "only applies with --trace")
    if num_requests and duration is not None:
        raise usage("duration_s", "give at most one of --duration_s and --num_requests for a "
                    "synthetic workload")
    if not num_requests:
        expected = f.total_rate * rate_scale * (duration if duration is not None else 300.0)
        if not expected <= cap:  # also catches an overflow to inf
            raise usage("rate_scale", f"--rate_scale={rate_scale:g} x --duration_s="
                        f"{duration if duration is not None else 300.0:g} would create about "
                        f"{expected:.3g} requests (fleet {fleet}: {f.total_rate:.3g} req/s at scale "
                        f"1), more than --max_workload_requests={cap} ({_memory(expected)}); "
                        f"lower --rate_scale or --duration_s, or raise --max_workload_requests")


def check_trace_window(num_requests: int, cap: int) -> None:
    if num_requests > cap:
        raise usage("trace", f"the replayed window holds {num_requests} requests, more than "
                    f"--max_workload_requests={cap} ({_memory(num_requests)}); narrow it with "
                    f"--duration_s / --num_requests or raise --max_workload_requests")


def check_paper_figures_flags(*, scenarios, valid_scenarios, systems, slo_systems, ablations,
                              workers) -> None:
    """`experiments.paper_figures`'s flags (before any simulation runs)."""
    from fineserve_jax.sim.config import SYSTEMS

    one_of("scenarios", scenarios, list(valid_scenarios))
    one_of("systems", systems, list(SYSTEMS))
    one_of("slo_systems", slo_systems, list(SYSTEMS), allow_empty=True)
    one_of("ablations", ablations, list(SYSTEMS), allow_empty=True)
    integer("workers", workers, lo=0, meaning="0 or 1: one process")


def _memory(n: float) -> str:
    return f"about {n * SIM_BYTES_PER_REQUEST / 2**30:.3g} GiB in the simulator"

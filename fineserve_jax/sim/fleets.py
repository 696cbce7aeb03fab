"""Named fleets (cluster + models + request lengths) for the simulator's experiments.
Pure Python.

    pair8b   the FineServe authors' example: Llama-3.1-8B in bf16 (`org`) and in fp8 weights
             + fp8 KV (`fp8_kv8`) sharing one GPU, 5 req/s each (examples/fineserve-2models.yaml
             in llm-fineserve/FineServe), ShareGPT-like lengths.
    mixed8   a mixed-precision 8B / 32B / 70B fleet on one node of 8 GPUs: eight models over
             seven presets, power-law rates (alpha 1) interleaved over the sizes, ShareGPT-like
             lengths.
    lmsys    MuxServe's LMSYS-Chat day-55 per-model rates (16 LLaMA 7B/13B/30B/65B models,
             bf16) on 4 nodes x 8 GPUs, LMSYS lengths (`workload.lmsys_rates`).
GPUs: H100 80 GB (the FineServe profiles are H100-class); `ClusterSpec` overrides apply.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

from fineserve_jax.scheduler.placement import ServedModel
from fineserve_jax.scheduler.plan import ClusterSpec
from fineserve_jax.workload.arrivals import power_law_weights
from fineserve_jax.workload.lengths import LMSYS_MEANS, SHAREGPT_MEANS


@dataclasses.dataclass(frozen=True)
class Fleet:
    name: str
    cluster: ClusterSpec
    models: Tuple[ServedModel, ...]
    lengths: str  # workload length preset ("sharegpt" | "lmsys")
    description: str = ""

    @property
    def total_rate(self) -> float:
        return sum(m.rate for m in self.models)

    def rates(self) -> Dict[str, float]:
        return {m.name: m.rate for m in self.models}

    def scaled(self, rate_scale: float = 1.0, slo_ttft_s: Optional[Dict[str, float]] = None) -> "Fleet":
        """The same fleet with every rate x `rate_scale` (and SLOs replaced if given)."""
        ms = tuple(dataclasses.replace(m, rate=m.rate * rate_scale,
                                       slo_ttft_s=(slo_ttft_s or {}).get(m.name, m.slo_ttft_s))
                   for m in self.models)
        return dataclasses.replace(self, models=ms)

    def with_cluster(self, **kw) -> "Fleet":
        return dataclasses.replace(self, cluster=dataclasses.replace(self.cluster, **kw))


def _lengths(preset: str) -> Tuple[float, float]:
    return {"sharegpt": SHAREGPT_MEANS, "lmsys": LMSYS_MEANS}[preset]


def pair8b() -> Fleet:
    p, o = _lengths("sharegpt")
    models = (ServedModel("llama8b-org", "llama-3.1-8b", "org", 5.0, None, p, o),
              ServedModel("llama8b-fp8", "llama-3.1-8b", "fp8_kv8", 5.0, None, p, o))
    return Fleet("pair8b", ClusterSpec(1, 1), models, "sharegpt",
                 "Llama-3.1-8B org + fp8_kv8 on one H100, 5 req/s each")


MIXED8 = (  # name, config, preset; rates follow a power law in this (interleaved) order
    ("8b-org", "llama-3.1-8b", "org"),
    ("32b-fp8", "qwen2.5-32b", "fp8_kv8"),
    ("70b-awq", "llama-3.1-70b", "awq"),
    ("8b-fp8", "llama-3.1-8b", "fp8_kv8"),
    ("32b-org", "qwen2.5-32b", "org"),
    ("70b-fp8", "llama-3.1-70b", "fp8_kv8"),
    ("8b-awq", "llama-3.1-8b", "awq"),
    ("8b-qoq", "llama-3.1-8b", "qoq"),
)


def mixed8(top_rate: float = 8.0, alpha: float = 1.0) -> Fleet:
    p, o = _lengths("sharegpt")
    w = power_law_weights(len(MIXED8), alpha)
    models = tuple(ServedModel(n, c, pr, float(top_rate * wi), None, p, o)
                   for (n, c, pr), wi in zip(MIXED8, w))
    return Fleet("mixed8", ClusterSpec(1, 8), models, "sharegpt",
                 "8 models (Llama-3.1-8B x4 presets, Qwen2.5-32B x2, Llama-3.1-70B x2) on 8 H100s")


def lmsys(condense: int = 500) -> Fleet:
    from fineserve_jax.workload.rates import lmsys_rates

    rc = lmsys_rates(condense)
    p, o = _lengths("lmsys")
    models = tuple(ServedModel(m.name, m.model, "org", m.rate, None, p, o) for m in rc.models)
    return Fleet("lmsys", ClusterSpec(rc.nnodes, rc.ngpus_per_node), models, "lmsys",
                 f"MuxServe LMSYS day-55 rates (condense {condense}): {len(models)} LLaMA models "
                 f"on {rc.num_gpus} H100s")


FLEETS: Dict[str, Callable[[], Fleet]] = {"pair8b": pair8b, "mixed8": mixed8, "lmsys": lmsys}


def get_fleet(name: str) -> Fleet:
    try:
        return FLEETS[name]()
    except KeyError:
        raise ValueError(f"unknown fleet {name!r}; valid: {', '.join(FLEETS)}") from None


def fleet_names() -> List[str]:
    return list(FLEETS)


def fleet_workload(fleet: Fleet, *, duration_s: Optional[float] = None,
                   num_requests: Optional[int] = None, arrival: str = "poisson", cv: float = 1.0,
                   seed: int = 0, trace: Optional[str] = None, trace_start_s: float = 0.0,
                   trace_time_scale: Optional[float] = None,
                   trace_target_rate: Optional[float] = None, prefixes=None):
    """The fleet's requests: synthetic (`generate_workload` at the fleet's rates and lengths)
    or, with `trace`, an Azure-format trace replayed with its own arrivals and lengths and each
    request assigned to a model with probability proportional to the fleet's rates. SLOs are
    left empty (the placement fills in each model's). `duration_s` bounds the synthetic
    workload or the trace window (trace seconds, before time scaling). `prefixes`: a
    `workload.PrefixSharing` for synthetic workloads (shared system prompts, sessions)."""
    from fineserve_jax.workload.spec import ModelLoad, generate_workload
    from fineserve_jax.workload.traces import replay_trace

    if trace is not None:
        if prefixes is not None:
            raise ValueError("shared prefixes apply to synthetic workloads, not to a trace")
        return replay_trace(trace, fleet.rates(), start_s=trace_start_s, duration_s=duration_s,
                            max_requests=num_requests, time_scale=trace_time_scale,
                            target_rate=trace_target_rate, seed=seed)
    loads = [ModelLoad(m.name, m.rate) for m in fleet.models]
    return generate_workload(loads, duration_s=duration_s, num_requests=num_requests, arrival=arrival,
                             cv=cv, lengths=fleet.lengths, seed=seed, prefixes=prefixes)

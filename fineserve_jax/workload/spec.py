"""Workload values and the synthetic workload generator. Pure Python + numpy, seeded.

`generate_workload` superposes one renewal arrival stream per model (Poisson or Gamma with a
given CV), samples prompt/output lengths per request, and returns the requests sorted by
arrival time with request ids 0..n-1 in that order.

Seeding: `np.random.SeedSequence(seed)` spawns one child per model (in the order given), and
each child spawns an arrival, a prompt-length and an output-length stream. So the same seed
and model list give the same workload, changing the length distribution does not move
arrivals, and `num_requests=n` gives exactly the first n requests of a longer run.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from fineserve_jax.workload.arrivals import arrival_times, check_process
from fineserve_jax.workload.lengths import LengthsLike, RequestLengths, as_lengths
from fineserve_jax.workload.prefixes import PrefixSharing, Segments, assign_prefixes, prompt_tokens


@dataclasses.dataclass(frozen=True)
class WorkloadRequest:
    """One request of a generated or replayed workload (times in seconds from t = 0)."""

    request_id: int
    model: str
    arrival_s: float
    prompt_len: int
    output_len: int
    slo_ttft_s: Optional[float] = None
    # What the prompt starts with: (token stream, tokens) segments shared with other
    # requests (system prompts, earlier turns of a session); see workload.prefixes.
    prefix: Segments = ()

    def prompt_tokens(self, vocab_size: int) -> List[int]:
        """The prompt's token ids (deterministic; shared segments are equal across requests)."""
        return prompt_tokens(self.request_id, self.prompt_len, self.prefix, vocab_size)


@dataclasses.dataclass(frozen=True)
class ModelLoad:
    """One model's share of a workload: mean rate (req/s), optional TTFT SLO and lengths."""

    name: str
    rate: float
    slo_ttft_s: Optional[float] = None
    lengths: LengthsLike = None  # None: the workload-wide lengths

    def __post_init__(self):
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ValueError(f"model {self.name!r}: rate must be finite and >= 0, got {self.rate!r}")
        if self.slo_ttft_s is not None and not self.slo_ttft_s > 0:
            raise ValueError(f"model {self.name!r}: slo_ttft_s must be > 0, got {self.slo_ttft_s!r}")


ModelsLike = Union[Mapping[str, float], Sequence[ModelLoad]]

# generate_workload refuses to build more requests than this by default (a WorkloadRequest
# takes ~250 B: 20M is ~5 GB); a rate or duration typo must not end in a MemoryError.
MAX_GENERATED_REQUESTS = 20_000_000


def check_number(name: str, value, lo: float = -math.inf, lo_open: bool = False,
                 optional: bool = False) -> Optional[float]:
    """`value` as a finite float >= lo (> lo with lo_open); None passes when `optional`.
    Raises ValueError naming the argument."""
    if value is None and optional:
        return None
    bound = "" if lo == -math.inf else f" {'>' if lo_open else '>='} {lo:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < lo or (lo_open and v == lo):
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return v


def check_count(name: str, value, lo: int = 0, optional: bool = False) -> Optional[int]:
    """`value` as an int >= lo (numpy ints accepted, bools and floats not)."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def as_model_loads(models: ModelsLike, slo_ttft_s: Optional[float] = None) -> List[ModelLoad]:
    """Normalize a dict name -> rate or a list of ModelLoad (default SLO filled in)."""
    if isinstance(models, Mapping):
        loads = [ModelLoad(str(k), float(v), slo_ttft_s) for k, v in models.items()]
    else:
        loads = []
        for m in models:
            if not isinstance(m, ModelLoad):
                raise TypeError(f"expected ModelLoad, got {type(m).__name__}: {m!r}")
            if m.slo_ttft_s is None and slo_ttft_s is not None:
                m = dataclasses.replace(m, slo_ttft_s=slo_ttft_s)
            loads.append(m)
    names = [m.name for m in loads]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate model names: {names}")
    if not loads:
        raise ValueError("a workload needs at least one model")
    return loads


def generate_workload(
    models: ModelsLike,
    duration_s: Optional[float] = None,
    num_requests: Optional[int] = None,
    *,
    arrival: str = "poisson",
    cv: float = 1.0,
    lengths: LengthsLike = None,
    seed: int = 0,
    start_s: float = 0.0,
    slo_ttft_s: Optional[float] = None,
    request_limit: int = MAX_GENERATED_REQUESTS,
    prefixes: Optional[PrefixSharing] = None,
) -> List[WorkloadRequest]:
    """Generate a multi-model workload, sorted by arrival time.

    models: dict name -> rate (req/s) or a list of ModelLoad.
    duration_s: keep every arrival in [start_s, start_s + duration_s); or
    num_requests: keep the first `num_requests` arrivals of the merged stream.
    arrival: "poisson" or "gamma" (with coefficient of variation `cv`).
    lengths: None (ShareGPT-like), "sharegpt", "lmsys", "fixed:P,O", (P, O), a
      RequestLengths; a ModelLoad's own `lengths` overrides it for that model.
    slo_ttft_s: default TTFT SLO for models that have none.
    prefixes: shared system prompts / multi-turn sessions (`PrefixSharing`); the sampled
      prompt length is then the request's own part (system prompts add to it). Drawn from
      a separate seed stream, so arrivals and lengths do not move.
    request_limit: refuse (ValueError) when the expected number of requests (sum of rates x
      duration_s, or num_requests) exceeds it, before anything is allocated.
    """
    if (duration_s is None) == (num_requests is None):
        raise ValueError("give exactly one of duration_s or num_requests")
    duration_s = check_number("duration_s", duration_s, 0.0, optional=True)
    num_requests = check_count("num_requests", num_requests, optional=True)
    start_s = check_number("start_s", start_s)
    check_count("request_limit", request_limit)
    check_process(arrival, cv)
    loads = as_model_loads(models, slo_ttft_s)
    expected = num_requests if num_requests is not None else sum(m.rate for m in loads) * duration_s
    if not expected <= request_limit:  # also catches inf
        raise ValueError(
            f"the workload would hold about {expected:.3g} requests "
            + ("(num_requests)" if num_requests is not None else
               f"(rates summing to {sum(m.rate for m in loads):.3g} req/s x duration_s={duration_s:g})")
            + f", more than request_limit={request_limit}")
    if num_requests is not None and num_requests > 0 and not any(m.rate > 0 for m in loads):
        raise ValueError("num_requests > 0 needs at least one model with a positive rate")
    default_lengths = as_lengths(lengths)
    # (arrival, prompt, output) seed sequences per model; spawn() is stateful, so once.
    seeds = [tuple(c.spawn(3)) for c in np.random.SeedSequence(seed).spawn(len(loads))]

    per_model_times = []
    for m, (arr_seed, _, _) in zip(loads, seeds):
        rng = np.random.default_rng(arr_seed)
        if duration_s is not None:
            t = arrival_times(rng, m.rate, duration_s=duration_s, process=arrival, cv=cv, start_s=start_s)
        else:
            # Any model contributes at most num_requests of the first num_requests arrivals.
            t = arrival_times(rng, m.rate, num=num_requests, process=arrival, cv=cv, start_s=start_s)
        per_model_times.append(t)

    all_t = np.concatenate(per_model_times) if per_model_times else np.zeros(0)
    all_m = np.concatenate([np.full(len(t), i, dtype=np.int64) for i, t in enumerate(per_model_times)])
    order = np.lexsort((all_m, all_t))  # by time, then model index
    if num_requests is not None:
        order = order[:num_requests]
    kept_m = all_m[order]
    kept_t = all_t[order]

    # Lengths: each model's length stream, in that model's arrival order.
    prompt = np.zeros(len(order), dtype=np.int64)
    output = np.zeros(len(order), dtype=np.int64)
    for i, (m, (_, p_seed, o_seed)) in enumerate(zip(loads, seeds)):
        idx = np.nonzero(kept_m == i)[0]
        if idx.size == 0:
            continue
        lens: RequestLengths = as_lengths(m.lengths) if m.lengths is not None else default_lengths
        prompt[idx] = lens.prompt.sample(np.random.default_rng(p_seed), idx.size)
        output[idx] = lens.output.sample(np.random.default_rng(o_seed), idx.size)

    prefix: List[Segments] = [()] * len(order)
    if prefixes is not None:
        for i, m in enumerate(loads):
            idx = np.nonzero(kept_m == i)[0]
            if idx.size == 0:
                continue
            rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(len(loads))[i].spawn(4)[3])
            lens, segs = assign_prefixes([m.name] * idx.size, prompt[idx], output[idx], prefixes, rng)
            prompt[idx] = lens
            for j, sg in zip(idx, segs):
                prefix[j] = sg

    return [
        WorkloadRequest(
            request_id=j,
            model=loads[int(kept_m[j])].name,
            arrival_s=float(kept_t[j]),
            prompt_len=int(prompt[j]),
            output_len=int(output[j]),
            slo_ttft_s=loads[int(kept_m[j])].slo_ttft_s,
            prefix=prefix[j],
        )
        for j in range(len(order))
    ]


def workload_stats(requests: Iterable[WorkloadRequest], duration_s: Optional[float] = None) -> Dict:
    """Per-model and overall counts, rates and mean lengths of a workload (for logs/tests)."""
    reqs = list(requests)
    if duration_s is None:
        duration_s = max((r.arrival_s for r in reqs), default=0.0) - min((r.arrival_s for r in reqs), default=0.0)

    def block(rs):
        n = len(rs)
        return {
            "requests": n,
            "rate_rps": (n / duration_s) if duration_s else None,
            "mean_prompt_len": float(np.mean([r.prompt_len for r in rs])) if n else None,
            "mean_output_len": float(np.mean([r.output_len for r in rs])) if n else None,
        }

    by_model: Dict[str, list] = {}
    for r in reqs:
        by_model.setdefault(r.model, []).append(r)
    return {
        "models": {k: block(v) for k, v in by_model.items()},
        "overall": block(reqs),
        "duration_s": duration_s,
    }

"""Stage 1 of the local scheduler: order waiting requests of all models for admission into
KV memory. Every policy ages: the longer a request waits, the earlier it sorts, so none
starves (pure Python)."""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List

from fineserve_jax.core.request import RequestState

# Relative speed rank of presets: lower is admitted earlier by the precision-aware policy
# (smaller KV and weights: more requests per byte, shorter steps).
PRECISION_RANK = {"qoq": 0, "awq": 1, "fp8_kv8": 1, "int8_kv8": 1, "fp8": 2, "int8": 2, "org": 3}

ADMISSION_POLICIES = ("deadline", "fcfs", "shortest", "precision")


def admission_key(policy: str, presets: Dict[str, str], aging_s: float
                  ) -> Callable[[RequestState, float], tuple]:
    """A sort key `(seq, now) -> tuple` for `policy`; smaller sorts first.

    Aging: `aging_s` seconds of waiting are worth one unit of the policy's primary key
    (a deadline second, a prompt of `aging_tokens` tokens, a precision rank).
    """
    if policy not in ADMISSION_POLICIES:
        raise ValueError(f"unknown admission policy {policy!r}; valid: {', '.join(ADMISSION_POLICIES)}")

    def waited(seq, now):
        return max(now - seq.arrival_s, 0.0) / aging_s if aging_s > 0 else 0.0

    if policy == "fcfs":
        return lambda s, now: (s.arrival_s, s.request_id)
    if policy == "deadline":
        # Earliest deadline first; requests without an SLO age like everyone else.
        return lambda s, now: (s.low_priority, s.deadline_s - waited(s, now) if s.slo_ttft_s is not None
                               else s.arrival_s + 1e6 - waited(s, now), s.request_id)
    if policy == "shortest":
        return lambda s, now: (s.num_tokens / 64.0 - waited(s, now), s.request_id)
    return lambda s, now: (PRECISION_RANK.get(presets.get(s.model, "org"), 3) - waited(s, now),
                           s.arrival_s, s.request_id)


def order_waiting(waiting: Iterable[RequestState], key, now: float) -> List[RequestState]:
    return sorted(waiting, key=lambda s: key(s, now))

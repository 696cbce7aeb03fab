"""Stage 2 of the local scheduler: which model steps next, and with which requests.

`saab` is FineServe's SLO-aware adaptive batching: predict each waiting request's TTFT
from the cost model, drop (or deprioritise) the hopeless ones, and grow the prefill batch
while every request in it still meets its deadline. `round_robin` and `fcfs` are the
baselines. Pure Python.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from fineserve_jax.core.model_entry import ModelLimits
from fineserve_jax.core.request import RequestState

EXECUTION_POLICIES = ("saab", "round_robin", "fcfs")


def pack_prefill(pending: List[RequestState], limits: ModelLimits, now: float, cost, model: str,
                 slo_aware: bool) -> Tuple[List[RequestState], List[int]]:
    """Choose prefill chunks in `pending` order within the token/sequence limits.

    With `slo_aware`, stop growing the batch as soon as the predicted finish of the batch
    would make an already-included request (with an SLO) miss its deadline.
    """
    seqs, chunks, total = [], [], 0
    for s in pending:
        if len(seqs) == limits.max_prefill_seqs or total == limits.max_prefill_tokens:
            break
        n = min(s.num_pending_prefill, limits.max_prefill_tokens - total)
        if n <= 0:
            continue
        if slo_aware and seqs:
            finish = now + cost.prefill_time(model, total + n, len(seqs) + 1)
            if any(finish > q.deadline_s for q in seqs + [s]
                   if q.first_token_s is None and not q.low_priority):
                break
        seqs.append(s)
        chunks.append(n)
        total += n
    return seqs, chunks


def pick_decode_model(decodable: Dict[str, List[RequestState]], last_step_s: Dict[str, float]
                      ) -> Optional[str]:
    """The model whose decode batch has waited longest (keeps TPOT even across models)."""
    ready = [m for m, v in decodable.items() if v]
    return min(ready, key=lambda m: last_step_s.get(m, -1.0)) if ready else None

"""Replay a served run in the simulator (pure Python).

A run of the engine is recorded as its clock readings (`core.clock.RecordingClock`) and its
steps (`DeviceLoop.step_log`: what ran, how long it took, what the step-time profile was fed).
The simulator then runs the same requests through the same device loop with a
`ReplayExecutor` that answers each step with the recorded duration and a `ReplayClock` that
reproduces the recorded timeline. Because the loop, the scheduler, the allocator and the
submission rule are one code, every request must end the same way with the same number of
tokens at the same times; any difference is a logic difference between serving and
simulating (the executor raises `ReplayDiverged` as soon as the plans differ).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence

from fineserve_jax.core.clock import ReplayDiverged
from fineserve_jax.core.loop import StepRecord
from fineserve_jax.core.request import RequestState
from fineserve_jax.core.executor import HostOnlyExecutor
from fineserve_jax.core.step_plan import StepPlan, StepResult


class ReplayExecutor(HostOnlyExecutor):
    """Answers the i-th step with the i-th recorded step; checks that the plan is the one
    that ran (model, kind, rows, bucket). Tokens are a constant (replayed requests ignore
    EOS, so only their count matters)."""

    def __init__(self, steps: Sequence[StepRecord], bucket_of: Callable[[StepPlan], int],
                 token: int = 7):
        self.steps = list(steps)
        self.bucket_of = bucket_of
        self.token = token
        self.i = 0

    def run(self, plan: StepPlan, while_running: Callable[[], None]) -> StepResult:
        if self.i >= len(self.steps):
            raise ReplayDiverged(f"the replay ran more than the {len(self.steps)} recorded steps")
        rec = self.steps[self.i]
        got = (plan.model, plan.kind, len(plan.seqs), self.bucket_of(plan))
        want = (rec.model, rec.kind, rec.rows, rec.bucket)
        if got != want:
            raise ReplayDiverged(f"step {self.i}: the replay planned {got}, the run had {want}")
        self.i += 1
        while_running()
        return StepResult([self.token] * len(plan.seqs), rec.seconds, rec.bucket,
                          rec.device_seconds)


@dataclasses.dataclass
class ReplayComparison:
    requests: int
    identical_outcomes: bool
    max_ttft_diff_ms: Optional[float]
    mismatches: List[dict]
    outcomes: Dict[str, int]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def compare_runs(served: Sequence[RequestState], replayed: Sequence[RequestState]) -> ReplayComparison:
    """Per request (same order): the same end (finished / dropped / failed), the same number
    of generated tokens; the largest TTFT difference over requests that got a first token."""
    if len(served) != len(replayed):
        raise ValueError(f"{len(served)} served vs {len(replayed)} replayed requests")
    mismatches, diffs, outcomes = [], [], {}
    for a, b in zip(served, replayed):
        outcomes[a.status.value] = outcomes.get(a.status.value, 0) + 1
        same = (a.status, len(a.output_token_ids)) == (b.status, len(b.output_token_ids))
        if a.first_token_s is not None and b.first_token_s is not None:
            diffs.append(abs((a.first_token_s - a.arrival_s) - (b.first_token_s - b.arrival_s)))
        elif (a.first_token_s is None) != (b.first_token_s is None):
            same = False
        if not same:
            mismatches.append({"request_id": a.request_id, "served": [a.status.value, len(a.output_token_ids)],
                               "replayed": [b.status.value, len(b.output_token_ids)]})
    worst = max(diffs) * 1e3 if diffs else None
    return ReplayComparison(len(served), not mismatches, worst if worst is None or math.isfinite(worst)
                            else None, mismatches[:20], outcomes)

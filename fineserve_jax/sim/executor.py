"""The simulator's executor: a step takes the time the cost model predicts (pure Python).

Tokens are a constant (simulated requests have `ignore_eos`, so only their count matters).
A CPU backend's first step after an idle spell runs cold (its thread pool and caches): with
`wakeup_s` > 0 such a step is charged that much more (measured by experiments.profile).
"""

from __future__ import annotations

from typing import Callable

from fineserve_jax.core.executor import HostOnlyExecutor
from fineserve_jax.core.step_plan import StepPlan, StepResult
from fineserve_jax.scheduler.step_cost import CostModelStepCost


class CostModelExecutor(HostOnlyExecutor):
    def __init__(self, cost: CostModelStepCost, clock, token_id: int = 7, wakeup_s: float = 0.0,
                 wakeup_idle_s: float = 0.005):
        self.cost, self.clock, self.token_id = cost, clock, token_id
        self.wakeup_s, self.wakeup_idle_s = wakeup_s, wakeup_idle_s
        self._last_end = 0.0  # the device starts idle at t = 0

    def run(self, plan: StepPlan, while_running: Callable[[], None]) -> StepResult:
        while_running()
        dt = self.cost.step_time(plan)
        now = self.clock.now()
        if self.wakeup_s and now - self._last_end >= self.wakeup_idle_s:
            dt += self.wakeup_s
        self._last_end = now + dt
        return StepResult([self.token_id] * len(plan.seqs), dt)

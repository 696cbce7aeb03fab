"""Step times of one simulated device: the `StepCost` protocol the local scheduler queries,
answered by the cost model at the device's tensor-parallel size. Pure Python."""

from __future__ import annotations

import bisect
from typing import Mapping, Optional, Sequence, Tuple

from fineserve_jax.scheduler.execution import StepPlan


def round_up(n: int, sizes: Optional[Sequence[int]]) -> int:
    """The smallest of `sizes` (ascending) that holds n; n itself beyond the largest or
    without sizes."""
    if not sizes:
        return n
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else n


class CostModelStepCost:
    """`StepCost` over a `CostModel` for the models of one device.

    models: served name -> (config name, preset); every model runs at the device's `tp`.
    prefill_buckets / decode_buckets: an engine that runs fixed shapes (ours: AOT-compiled
    buckets) pays for the padded size, so token counts / batch sizes are rounded up to the
    next bucket before the cost model is asked; None (default) charges the exact size.
    The scheduler's predictions and the simulated step durations come from the same model, so
    the scheduler sees a perfectly calibrated cost model; `observe` is therefore a no-op.
    """

    def __init__(self, cost, models: Mapping[str, Tuple[str, str]], tp: int = 1,
                 prefill_buckets: Optional[Sequence[int]] = None,
                 decode_buckets: Optional[Sequence[int]] = None):
        self.cost = cost
        self.tp = int(tp)
        self._m = dict(models)
        self._pb = sorted(prefill_buckets) if prefill_buckets else None
        self._db = sorted(decode_buckets) if decode_buckets else None

    def prefill_time(self, model: str, num_tokens: int, num_seqs: int = 1, context: float = 0.0) -> float:
        """Seconds to prefill `num_tokens` tokens over `num_seqs` sequences with `context`
        cached tokens each."""
        config, preset = self._m[model]
        return self.cost.prefill_time(config, preset, round_up(num_tokens, self._pb), max(int(num_seqs), 1),
                                      context, self.tp)

    def decode_time(self, model: str, batch: int, context: float = 0.0) -> float:
        """Seconds of one decode step of `batch` sequences of mean context `context` tokens."""
        config, preset = self._m[model]
        return self.cost.decode_time(config, preset, round_up(batch, self._db), context, self.tp)

    def observe(self, model: str, kind: str, size: int, seconds: float) -> None:
        pass

    def step_time(self, plan: StepPlan) -> float:
        """Seconds the step `plan` takes; call before `on_step_done` changes the sequences.

        Prefill: the chunks' tokens over their sequences, with the mean number of tokens they
        already have cached (chunked prefill, recompute after preemption). Decode: one token
        per sequence at their mean context (every cached token plus the new one).
        """
        seqs = plan.seqs
        n = len(seqs)
        if plan.kind == "prefill":
            cached = sum(s.num_computed for s in seqs) / n
            return self.prefill_time(plan.model, plan.num_tokens, n, cached)
        context = sum(s.num_computed for s in seqs) / n + 1.0
        return self.decode_time(plan.model, n, context)


def load_cost_model(paths=None):
    """The simulator's cost model: `CostModel.from_csv(paths)`, or the shared FineServe
    profiles by default. Extrapolation warnings (one per group) are expected (ShareGPT prompts
    are shorter than the profiled 256..512 tokens; the counts stay in the cost model), so the
    cost model's logger is set to errors only."""
    import logging

    from fineserve_jax.scheduler.cost_model import CostModel

    logging.getLogger("fineserve_jax.scheduler.cost_model").setLevel(logging.ERROR)
    return CostModel.from_csv(list(paths)) if paths else CostModel.from_profiles()

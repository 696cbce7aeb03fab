"""Step-time prediction: the one protocol the local scheduler queries, and its two
implementations (pure Python).

  BucketProfile      the engine's: each compiled bucket timed at warm-up, corrected online
                     with measured device-bound step times.
  CostModelStepCost  the simulator's: a fitted `CostModel` at the device's tensor-parallel
                     size; it is the simulated device's ground truth, so it never corrects.

Both charge the padded bucket a step runs at (`core.buckets.bucketed_steps`): beyond the
largest bucket, work is charged as several steps.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Protocol, Sequence, Tuple

from fineserve_jax.core.buckets import bucketed_steps, round_up
from fineserve_jax.core.step_plan import StepPlan


class StepCost(Protocol):
    def prefill_time(self, model: str, num_tokens: int, num_seqs: int = 1,
                     context: float = 0.0) -> float:
        """Seconds to prefill `num_tokens` tokens over `num_seqs` sequences that already
        hold `context` cached tokens each."""
        ...

    def decode_time(self, model: str, batch: int, context: float = 0.0) -> float:
        """Seconds of decode steps for `batch` sequences of mean context `context`."""
        ...

    def observe(self, model: str, kind: str, size: int, seconds: float) -> None:
        """A measured device-bound time of a `kind` step at bucket `size`."""
        ...


class BucketProfile:
    """Step time per (model, kind, bucket size), from warm-up timings of the compiled steps.

    A query charges the bucket(s) the work will actually run in (the shapes are fixed, so
    the time barely depends on the real token count). `observe` folds measured step times in
    with an exponential moving average, so the profile tracks the machine online.
    """

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self._t: Dict[Tuple[str, str], Dict[int, float]] = {}
        self._sizes: Dict[Tuple[str, str], Sequence[int]] = {}

    def set(self, model: str, kind: str, size: int, seconds: float) -> None:
        table = self._t.setdefault((model, kind), {})
        table[size] = seconds
        self._sizes[(model, kind)] = sorted(table)

    def _lookup(self, model: str, kind: str, n: int) -> float:
        sizes = self._sizes.get((model, kind))
        if not sizes:
            raise KeyError(f"no {kind} profile for model {model!r}")
        table = self._t[(model, kind)]
        return sum(table[b] for b in bucketed_steps(max(int(n), 1), sizes))

    def prefill_time(self, model: str, num_tokens: int, num_seqs: int = 1,
                     context: float = 0.0) -> float:
        return self._lookup(model, "prefill", num_tokens)

    def decode_time(self, model: str, batch: int, context: float = 0.0) -> float:
        return self._lookup(model, "decode", batch)

    def observe(self, model: str, kind: str, size: int, seconds: float) -> None:
        table = self._t.get((model, kind))
        if table is None or size not in table:
            self.set(model, kind, size, seconds)
        else:
            table[size] = (1 - self.alpha) * table[size] + self.alpha * seconds

    def as_dict(self) -> dict:
        return {f"{m}/{k}": dict(v) for (m, k), v in self._t.items()}


class CostModelStepCost:
    """`StepCost` over a `CostModel` for the models of one device.

    models: served name -> (config name, preset); every model runs at the device's `tp`.
    prefill_buckets / decode_buckets: an engine that runs fixed shapes pays for the padded
    size, so token counts / batch sizes are rounded up to the next bucket before the cost
    model is asked; None (default) charges the exact size.
    """

    def __init__(self, cost, models: Mapping[str, Tuple[str, str]], tp: int = 1,
                 prefill_buckets: Optional[Sequence[int]] = None,
                 decode_buckets: Optional[Sequence[int]] = None):
        self.cost = cost
        self.tp = int(tp)
        self._m = dict(models)
        self._pb = sorted(prefill_buckets) if prefill_buckets else None
        self._db = sorted(decode_buckets) if decode_buckets else None

    def prefill_time(self, model: str, num_tokens: int, num_seqs: int = 1,
                     context: float = 0.0) -> float:
        config, preset = self._m[model]
        num_tokens, num_seqs = max(int(num_tokens), 1), max(int(num_seqs), 1)
        if self._pb is None or num_tokens <= self._pb[-1]:  # the common case: one step
            return self.cost.prefill_time(config, preset, round_up(num_tokens, self._pb),
                                          num_seqs, context, self.tp)
        total, done = 0.0, 0
        for b in bucketed_steps(num_tokens, self._pb):
            part = min(b, num_tokens - done)
            seqs = max(1, math.ceil(num_seqs * part / num_tokens))
            total += self.cost.prefill_time(config, preset, b, seqs, context + done / num_seqs,
                                            self.tp)
            done += part
        return total

    def decode_time(self, model: str, batch: int, context: float = 0.0) -> float:
        config, preset = self._m[model]
        return sum(self.cost.decode_time(config, preset, b, context, self.tp)
                   for b in bucketed_steps(max(int(batch), 1), self._db))

    def observe(self, model: str, kind: str, size: int, seconds: float) -> None:
        pass  # the cost model *is* the simulated device

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

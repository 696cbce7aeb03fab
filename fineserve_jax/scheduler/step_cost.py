"""The interface the local scheduler uses to predict step times, and the engine's
bucket-profile implementation (measured at warm-up, corrected online). Pure Python."""

from __future__ import annotations

import bisect
from typing import Dict, Protocol, Sequence, Tuple


class StepCost(Protocol):
    def prefill_time(self, model: str, num_tokens: int, num_seqs: int = 1) -> float: ...

    def decode_time(self, model: str, batch: int, context: float) -> float: ...

    def observe(self, model: str, kind: str, size: int, seconds: float) -> None: ...


class BucketProfile:
    """Step time per (model, kind, bucket size), from warm-up timings of the compiled steps.

    A query picks the bucket the step will actually run in (the shapes are fixed, so the
    time barely depends on the real token count). `observe` folds measured step times in
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
        i = min(bisect.bisect_left(sizes, n), len(sizes) - 1)
        t = self._t[(model, kind)][sizes[i]]
        return t * (n / sizes[i]) if n > sizes[-1] else t  # beyond the largest: linear

    def prefill_time(self, model: str, num_tokens: int, num_seqs: int = 1) -> float:
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

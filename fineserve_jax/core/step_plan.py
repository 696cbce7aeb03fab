"""What one step runs and what it gave back (pure Python)."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

from fineserve_jax.core.request import RequestState


@dataclasses.dataclass
class StepPlan:
    """One step to run. Prefill: `chunks[i]` tokens of `seqs[i]` starting at its
    `num_computed`. Decode: one token per sequence."""

    model: str
    kind: str  # "prefill" | "decode"
    seqs: List[RequestState]
    chunks: List[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.chunks)

    @property
    def size(self) -> int:
        """What the step's shape is chosen by: tokens (prefill) or rows (decode)."""
        return self.num_tokens if self.kind == "prefill" else len(self.seqs)


@dataclasses.dataclass
class StepResult:
    """An executor's answer to a `StepPlan`.

    tokens: one sampled token per row of the plan (in `plan.seqs` order).
    seconds: how long the step took (measured, predicted or recorded).
    bucket: the fixed shape it ran at (None: exact shape).
    device_seconds: a device-bound measurement to correct the step-time profile with, or
      None when the measurement says more about the host than about the device.
    """

    tokens: Sequence[int]
    seconds: float
    bucket: Optional[int] = None
    device_seconds: Optional[float] = None

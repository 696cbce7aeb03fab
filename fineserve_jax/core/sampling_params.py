"""Per-request sampling parameters (pure Python)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 disable them.

    `seed` makes sampling deterministic per request, whatever else shares the batch (the key
    of token i is `fold_in(PRNGKey(seed), i)`); None derives it from the request id.
    Generation stops at `max_tokens`, at any of `stop_token_ids`, or at the model's EOS
    unless `ignore_eos`.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def problem(self) -> Optional[str]:
        """A reason these parameters are invalid, or None."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            return f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            return f"temperature must be >= 0, got {self.temperature!r}"
        if not (0.0 < self.top_p <= 1.0):
            return f"top_p must be in (0, 1], got {self.top_p!r}"
        if not isinstance(self.top_k, int) or self.top_k < 0:
            return f"top_k must be an integer >= 0, got {self.top_k!r}"
        if self.seed is not None and not (0 <= int(self.seed) < 2**32):
            return f"seed must be in [0, 2**32), got {self.seed!r}"
        return None

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown sampling field(s): {', '.join(sorted(unknown))}")
        kw = dict(d)
        if "stop_token_ids" in kw:
            kw["stop_token_ids"] = tuple(kw["stop_token_ids"] or ())
        return cls(**kw)


def stop_ids(params: SamplingParams, eos_token_id: Optional[int]) -> Sequence[int]:
    ids = set(params.stop_token_ids)
    if eos_token_id is not None and not params.ignore_eos:
        ids.add(int(eos_token_id))
    return ids

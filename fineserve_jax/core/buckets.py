"""Fixed-shape batch buckets: every step runs at one of these shapes, so nothing
recompiles after warm-up (pure Python). `round_up` is the one bucket round-up the engine,
its step-time profile and the simulator share."""

from __future__ import annotations

import bisect
import dataclasses
from typing import List, Optional, Sequence, Tuple


def powers_of_two(lo: int, hi: int) -> Tuple[int, ...]:
    out, x = [], lo
    while x < hi:
        out.append(x)
        x *= 2
    out.append(hi)
    return tuple(sorted(set(out)))


def round_up(n: int, sizes: Optional[Sequence[int]]) -> Optional[int]:
    """The smallest of `sizes` (ascending) that holds `n`; None when `n` exceeds the largest.
    Without sizes, `n` itself (an engine without buckets runs the exact shape)."""
    if not sizes:
        return n
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def bucketed_steps(n: int, sizes: Optional[Sequence[int]]) -> List[int]:
    """The bucket of each step that `n` tokens (or rows) take: steps of the largest bucket,
    then the remainder rounded up. This is how work beyond one step's limit is charged by
    every step-time predictor (the scheduler never plans a step above the limit)."""
    if not sizes or n <= sizes[-1]:
        return [round_up(n, sizes)]
    full, rest = divmod(n, sizes[-1])
    return [sizes[-1]] * full + ([round_up(rest, sizes)] if rest else [])


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Decode batch sizes, prefill token counts, and the fixed shapes around them.

    decode: [batch] rows, block tables [batch, table_width].
    prefill: [tokens] packed tokens of at most `prefill_seqs` sequences, block tables
    [prefill_seqs, table_width].
    """

    decode_sizes: Tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    prefill_sizes: Tuple[int, ...] = (16, 32, 64, 128, 256)
    prefill_seqs: int = 8
    table_width: int = 32  # blocks per sequence = max context / tokens per block

    def __post_init__(self):
        for name in ("decode_sizes", "prefill_sizes"):
            v = getattr(self, name)
            if (not isinstance(v, tuple) or not v or list(v) != sorted(set(v))
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in v) or v[0] < 1):
                raise ValueError(f"Buckets.{name} must be a tuple of increasing positive ints, got {v!r}")
        for name in ("prefill_seqs", "table_width"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Buckets.{name} must be a positive int, got {v!r}")

    @property
    def max_decode(self) -> int:
        return self.decode_sizes[-1]

    @property
    def max_prefill(self) -> int:
        return self.prefill_sizes[-1]

    def sizes(self, kind: str) -> Tuple[int, ...]:
        return self.prefill_sizes if kind == "prefill" else self.decode_sizes

    def bucket(self, kind: str, n: int) -> int:
        """The bucket a `kind` step of `n` tokens (prefill) or rows (decode) runs in."""
        size = round_up(n, self.sizes(kind))
        if size is None:
            raise ValueError(f"{kind} of {n} exceeds the largest bucket {self.sizes(kind)[-1]}")
        return size

    def decode_bucket(self, batch: int) -> int:
        return self.bucket("decode", batch)

    def prefill_bucket(self, tokens: int) -> int:
        return self.bucket("prefill", tokens)

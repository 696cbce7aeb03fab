"""Fixed-shape batch buckets: every step runs at one of these shapes, so nothing
recompiles after warm-up (pure Python)."""

from __future__ import annotations

import bisect
import dataclasses
from typing import Tuple


def powers_of_two(lo: int, hi: int) -> Tuple[int, ...]:
    out, x = [], lo
    while x < hi:
        out.append(x)
        x *= 2
    out.append(hi)
    return tuple(sorted(set(out)))


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
            if not v or list(v) != sorted(set(v)) or v[0] < 1:
                raise ValueError(f"Buckets.{name} must be increasing positive sizes, got {v}")

    @property
    def max_decode(self) -> int:
        return self.decode_sizes[-1]

    @property
    def max_prefill(self) -> int:
        return self.prefill_sizes[-1]

    @staticmethod
    def _fit(sizes, n: int) -> int:
        i = bisect.bisect_left(sizes, n)
        if i == len(sizes):
            raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
        return sizes[i]

    def decode_bucket(self, batch: int) -> int:
        return self._fit(self.decode_sizes, batch)

    def prefill_bucket(self, tokens: int) -> int:
        return self._fit(self.prefill_sizes, tokens)

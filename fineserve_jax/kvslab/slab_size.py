"""Choosing the slab size from the block sizes of all registered KV formats (pure Python).

A slab that is a multiple of every block size (the least common multiple, LCM) wastes
nothing; but the LCM of unrelated sizes can be huge (e.g. bf16/fp8/int4 blocks of Llama-8B
and Qwen-32B: 2 MiB, 1.03 MiB and 1.13 MiB have an LCM of 198 MiB), and big slabs move
memory between formats coarsely. So: take the LCM when it is at most `max_lcm_factor` times
the target; otherwise take a *fixed* size, a multiple of the largest block near the target,
and count each format's tail `slab_bytes % block_bytes` as waste.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterable, Tuple

__all__ = ["SlabSizeChoice", "choose_slab_bytes", "num_slabs_for_arena"]

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class SlabSizeChoice:
    """The chosen slab size and what it costs.

    slab_bytes: bytes per slab. mode: "lcm" (no tail waste) or "fixed".
    tail_bytes: {block_bytes: slab_bytes % block_bytes}, bytes lost per slab formatted for
      that size. tail_fraction: the same over slab_bytes.
    lcm_bytes: LCM of the block sizes (for the record, also when not chosen).
    """

    slab_bytes: int
    mode: str
    block_bytes: Tuple[int, ...]
    tail_bytes: Dict[int, int]
    lcm_bytes: int
    target_slab_bytes: int
    max_waste: float

    @property
    def tail_fraction(self) -> Dict[int, float]:
        return {b: t / self.slab_bytes for b, t in self.tail_bytes.items()}

    @property
    def max_tail_fraction(self) -> float:
        return max(self.tail_fraction.values())

    def blocks_per_slab(self, block_bytes: int) -> int:
        return self.slab_bytes // block_bytes

    def explain(self) -> str:
        lines = [
            f"slab = {self.slab_bytes} B ({self.slab_bytes / MiB:.2f} MiB), mode {self.mode}; "
            f"LCM of block sizes = {self.lcm_bytes} B ({self.lcm_bytes / MiB:.2f} MiB), "
            f"target {self.target_slab_bytes / MiB:.2f} MiB"
        ]
        if self.mode == "lcm":
            lines.append("  the LCM is within the allowed factor of the target: no slab tails")
        else:
            lines.append("  the LCM is too large: fixed size, a multiple of the largest block")
            if self.max_tail_fraction > self.max_waste:
                lines.append(
                    f"  WARNING: no candidate keeps every tail under {self.max_waste:.1%}; "
                    "this is the one with the smallest worst tail"
                )
        for b in self.block_bytes:
            lines.append(
                f"  block {b} B: {self.slab_bytes // b} blocks/slab, tail {self.tail_bytes[b]} B "
                f"({self.tail_fraction[b]:.2%} of a slab)"
            )
        return "\n".join(lines)


def choose_slab_bytes(
    block_bytes_list: Iterable[int],
    target_slab_bytes: int = 64 * MiB,
    max_waste: float = 0.02,
    max_lcm_factor: float = 4.0,
) -> SlabSizeChoice:
    """Pick a slab size for these block sizes.

    Args:
      block_bytes_list: block bytes of every registered format (duplicates allowed).
      target_slab_bytes: the slab size we would like (granularity of memory flow).
      max_waste: largest acceptable tail, as a fraction of a slab, for any format (fixed mode).
      max_lcm_factor: take the LCM if it is <= this times the target.

    Fixed mode scans multiples of the largest block from the target up to
    `max_lcm_factor * target` and takes the smallest whose worst tail fraction is
    <= max_waste; if none qualifies, the one with the smallest worst tail.
    """
    sizes = sorted({_positive(int(b), "block bytes") for b in block_bytes_list})
    if not sizes:
        raise ValueError("choose_slab_bytes needs at least one block size")
    target = _positive(int(target_slab_bytes), "target_slab_bytes")
    if not 0 <= max_waste < 1:
        raise ValueError(f"max_waste must be in [0, 1), got {max_waste}")
    if max_lcm_factor < 1:
        raise ValueError(f"max_lcm_factor must be >= 1, got {max_lcm_factor}")
    lcm = math.lcm(*sizes)

    def choice(slab: int, mode: str) -> SlabSizeChoice:
        return SlabSizeChoice(
            slab_bytes=slab,
            mode=mode,
            block_bytes=tuple(sizes),
            tail_bytes={b: slab % b for b in sizes},
            lcm_bytes=lcm,
            target_slab_bytes=target,
            max_waste=max_waste,
        )

    if lcm <= max_lcm_factor * target:
        return choice(lcm, "lcm")
    largest = sizes[-1]
    lo = max(1, -(-target // largest))
    hi = max(lo, int(max_lcm_factor * target) // largest)
    best, best_worst = None, math.inf
    for m in range(lo, hi + 1):
        slab = m * largest
        worst = max((slab % b) / slab for b in sizes)
        if worst <= max_waste:
            return choice(slab, "fixed")
        if worst < best_worst:
            best, best_worst = slab, worst
    return choice(best, "fixed")


def device_slab_bytes(block_bytes_list: Iterable[int], target_slab_bytes: int = 64 * MiB) -> int:
    """The slab size a device arena uses for these block sizes: a common multiple of all of
    them (the typed views need whole blocks per slab, so no tails), the least common multiple
    scaled up to near `target_slab_bytes`. The engine and the simulator both size slabs here."""
    sizes = sorted({_positive(int(b), "block bytes") for b in block_bytes_list})
    if not sizes:
        raise ValueError("device_slab_bytes needs at least one block size")
    lcm = math.lcm(*sizes)
    return lcm * max(1, _positive(int(target_slab_bytes), "target_slab_bytes") // lcm)


def num_slabs_for_arena(arena_bytes: int, slab_bytes: int) -> int:
    """Slabs (null slab included) that fit in an arena byte budget; the remainder is unused.

    Raises ValueError when fewer than 2 fit (the null slab alone holds nothing).
    """
    arena_bytes = _positive(int(arena_bytes), "arena_bytes")
    slab_bytes = _positive(int(slab_bytes), "slab_bytes")
    n = arena_bytes // slab_bytes
    if n < 2:
        raise ValueError(
            f"an arena of {arena_bytes} B holds {n} slab(s) of {slab_bytes} B; "
            "need at least 2 (slab 0 is the reserved null slab)"
        )
    return n


def _positive(v: int, name: str) -> int:
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return v

"""The KV slab allocator: host-side bookkeeping of one device's KV arena (pure Python).

The arena is `num_slabs` equal slabs of `slab_bytes` bytes each (byte offset of slab s is
`s * slab_bytes`). A free slab is *formatted* on first use for one block size `B` and carved
into `slab_bytes // B` blocks; the last `slab_bytes % B` bytes of the slab (its *tail*) are
unused. When the last live block of a slab is freed, the slab goes back to the common free
list at once, so memory flows between formats at slab granularity.

Block ids are per block size: block `i` of slab `s` formatted for `B` has id
`s * (slab_bytes // B) + i`, so a format's typed arena view `[num_slabs * (S // B), B]`
is indexed directly by the id when `S % B == 0`. `block_byte_offset` is the one place that
turns an id into a byte offset (it is also right when `S % B != 0`).

Slab 0 is the null slab: padded rows and unused block-table entries point into it, so it is
never handed out.

Cost: `allocate(B, 1)` and `free(B, [id])` are O(log slabs of B) (a heap of partially used
slabs with lazy deletion) and do no per-slab scans; formatting a slab is O(1) (a bump pointer
plus a stack of recycled indices, no list of `S // B` free indices).
"""

from __future__ import annotations

import dataclasses
import heapq
import operator
from typing import Dict, Iterable, List, Sequence, Tuple

__all__ = [
    "OutOfKVMemory",
    "SlabAllocator",
    "FormatStats",
    "block_byte_offset",
]


class OutOfKVMemory(RuntimeError):
    """An allocation the arena cannot meet right now; the allocator was left unchanged.

    Attributes (all ints): `block_bytes`, `requested_blocks`, `free_blocks` (of that size,
    allocatable right now), `free_slabs`.
    """

    def __init__(self, block_bytes: int, requested_blocks: int, free_blocks: int, free_slabs: int,
                 slab_bytes: int):
        self.block_bytes = block_bytes
        self.requested_blocks = requested_blocks
        self.free_blocks = free_blocks
        self.free_slabs = free_slabs
        super().__init__(
            f"out of KV memory: requested {requested_blocks} blocks of {block_bytes} B "
            f"({requested_blocks * block_bytes} B), but only {free_blocks} such blocks "
            f"({free_blocks * block_bytes} B) are free: {free_slabs} free slabs of "
            f"{slab_bytes} B plus free blocks in partially used slabs of this size"
        )


def block_byte_offset(block_id, block_bytes: int, slab_bytes: int):
    """Byte offset of a block in the flat arena. Works on ints and on numpy int arrays.

    `slab * slab_bytes + index_in_slab * block_bytes`; equals `block_id * block_bytes` only
    when `slab_bytes % block_bytes == 0`.
    """
    per_slab = slab_bytes // block_bytes
    slab = block_id // per_slab
    return slab * slab_bytes + (block_id - slab * per_slab) * block_bytes


@dataclasses.dataclass(frozen=True)
class FormatStats:
    """Occupancy of the slabs formatted for one block size (counts; bytes where named)."""

    block_bytes: int
    blocks_per_slab: int
    tail_bytes: int  # per formatted slab: slab_bytes % block_bytes
    slabs: int  # slabs formatted for this size (partially or fully used)
    partial_slabs: int  # of which not full
    live_blocks: int
    free_blocks_in_slabs: int  # free blocks inside this size's slabs


class _Format:
    """Mutable state of one block size. Internal to SlabAllocator."""

    __slots__ = ("block_bytes", "per_slab", "tail_bytes", "slabs", "live", "heap")

    def __init__(self, block_bytes: int, slab_bytes: int):
        self.block_bytes = block_bytes
        self.per_slab = slab_bytes // block_bytes
        self.tail_bytes = slab_bytes % block_bytes
        self.slabs: set = set()  # formatted slab ids
        self.live = 0  # live blocks over all its slabs
        # Max-heap of partially used slabs keyed by used count: entries (-used, slab).
        # Entries go stale when a slab's count changes; a stale entry is dropped when it
        # reaches the top (lazy deletion) and the heap is rebuilt when it grows too large.
        self.heap: List[Tuple[int, int]] = []


class SlabAllocator:
    """Slab allocator of one KV arena; see the module docstring for the id and byte layout.

    Args:
      num_slabs: slabs in the arena, including the reserved null slab 0 (>= 1).
      slab_bytes: bytes per slab (>= 1).
    """

    def __init__(self, num_slabs: int, slab_bytes: int):
        num_slabs = _positive_int("num_slabs", num_slabs)
        slab_bytes = _positive_int("slab_bytes", slab_bytes)
        self._num_slabs = num_slabs
        self._slab_bytes = slab_bytes
        # Free slab ids, a min-heap: formatting takes the lowest free id, which keeps live
        # data at the front of the arena (easier to read in dumps, deterministic).
        self._free_slabs: List[int] = list(range(1, num_slabs))
        self._formats: Dict[int, _Format] = {}
        # Per-slab state, indexed by slab id (None / 0 while the slab is free).
        self._slab_fmt: List = [None] * num_slabs
        self._used: List[int] = [0] * num_slabs
        self._live: List = [None] * num_slabs  # bytearray(per_slab): 1 = live
        self._recycled: List = [None] * num_slabs  # stack of freed local indices
        self._fresh: List[int] = [0] * num_slabs  # local indices >= this were never used
        self._used_bytes = 0
        self._last_fmt: List = [None] * num_slabs  # the format a slab last held
        self.reformatted_slabs = 0  # slabs formatted for a different size than last time

    # --- geometry -------------------------------------------------------------------------

    @property
    def num_slabs(self) -> int:
        """Slabs in the arena, including the null slab."""
        return self._num_slabs

    @property
    def slab_bytes(self) -> int:
        return self._slab_bytes

    @property
    def total_bytes(self) -> int:
        """Arena bytes: num_slabs * slab_bytes (the null slab included)."""
        return self._num_slabs * self._slab_bytes

    def blocks_per_slab(self, block_bytes: int) -> int:
        return self._slab_bytes // self._check_block_bytes(block_bytes)

    def num_block_ids(self, block_bytes: int) -> int:
        """Exclusive upper bound of block ids of this size: rows of its typed arena view."""
        return self._num_slabs * self.blocks_per_slab(block_bytes)

    def block_byte_offset(self, block_bytes: int, block_id: int) -> int:
        return block_byte_offset(block_id, self._check_block_bytes(block_bytes), self._slab_bytes)

    def slab_of(self, block_bytes: int, block_id: int) -> int:
        """The slab that block `block_id` of size `block_bytes` lies in (live or not)."""
        per_slab = self.blocks_per_slab(block_bytes)
        block_id = operator.index(block_id)
        if not 0 <= block_id < self._num_slabs * per_slab:
            raise ValueError(
                f"block id {block_id} of {block_bytes} B is outside the arena "
                f"(0 <= id < {self._num_slabs * per_slab})"
            )
        return block_id // per_slab

    # --- occupancy ------------------------------------------------------------------------

    @property
    def free_slabs(self) -> int:
        """Slabs formatted for nothing (the null slab excluded)."""
        return len(self._free_slabs)

    @property
    def used_bytes(self) -> int:
        """Bytes held by live blocks."""
        return self._used_bytes

    @property
    def formats(self) -> Tuple[int, ...]:
        """Block sizes seen so far (whether or not they hold slabs now), ascending."""
        return tuple(sorted(self._formats))

    def free_blocks(self, block_bytes: int) -> int:
        """Blocks of this size allocatable right now: free blocks inside slabs formatted for
        it plus whole free slabs."""
        fmt = self._lookup(block_bytes)
        per_slab = self._slab_bytes // block_bytes
        in_slabs = len(fmt.slabs) * per_slab - fmt.live if fmt is not None else 0
        return in_slabs + len(self._free_slabs) * per_slab

    def formatted_slabs(self, block_bytes: int) -> int:
        """Slabs formatted for this size now (partially or fully used), O(1)."""
        fmt = self._lookup(block_bytes)
        return len(fmt.slabs) if fmt is not None else 0

    def live_blocks(self, block_bytes: int) -> int:
        fmt = self._lookup(block_bytes)
        return fmt.live if fmt is not None else 0

    def is_live(self, block_bytes: int, block_id: int) -> bool:
        """Whether `block_id` is a live block of this size (False for any other id)."""
        fmt = self._lookup(block_bytes)
        if fmt is None:
            return False
        slab, idx = divmod(operator.index(block_id), fmt.per_slab)
        if not 0 <= slab < self._num_slabs or self._slab_fmt[slab] is not fmt:
            return False
        return bool(self._live[slab][idx])

    def format_stats(self) -> Dict[int, FormatStats]:
        """Per block size occupancy. O(slabs) (counts partial slabs): not for hot loops."""
        used = self._used
        out = {}
        for b, fmt in sorted(self._formats.items()):
            out[b] = FormatStats(
                block_bytes=b,
                blocks_per_slab=fmt.per_slab,
                tail_bytes=fmt.tail_bytes,
                slabs=len(fmt.slabs),
                partial_slabs=sum(1 for s in fmt.slabs if used[s] < fmt.per_slab),
                live_blocks=fmt.live,
                free_blocks_in_slabs=len(fmt.slabs) * fmt.per_slab - fmt.live,
            )
        return out

    def waste_bytes(self) -> Dict[str, int]:
        """Bytes of formatted slabs that hold no live data, O(formats).

        `slab_tail`: `slab_bytes % B` per slab formatted for B (never usable);
        `free_in_partial_slabs`: free blocks inside formatted slabs (usable by that size
        only); `total`: their sum. Free slabs and the null slab are not waste here (see
        `stats()["reserved_bytes"]` for the latter).
        """
        tail = free = 0
        for b, fmt in self._formats.items():
            n = len(fmt.slabs)
            tail += n * fmt.tail_bytes
            free += (n * fmt.per_slab - fmt.live) * b
        return {"slab_tail": tail, "free_in_partial_slabs": free, "total": tail + free}

    def stats(self) -> dict:
        """A JSON-ready summary: geometry, occupancy, per-format stats, waste."""
        return {
            "num_slabs": self._num_slabs,
            "slab_bytes": self._slab_bytes,
            "total_bytes": self.total_bytes,
            "reserved_bytes": self._slab_bytes,  # the null slab
            "free_slabs": self.free_slabs,
            "used_bytes": self._used_bytes,
            "formats": {
                str(b): dataclasses.asdict(s) for b, s in self.format_stats().items()
            },
            "waste_bytes": self.waste_bytes(),
        }

    # --- per-slab introspection (compaction planning, debugging) ----------------------------

    def slabs_of(self, block_bytes: int) -> Dict[int, int]:
        """{slab id: live blocks} for the slabs formatted for this size."""
        fmt = self._lookup(block_bytes)
        if fmt is None:
            return {}
        return {s: self._used[s] for s in sorted(fmt.slabs)}

    def slab_block_ids(self, slab: int, live: bool = True) -> List[int]:
        """Ids of the live (or, with live=False, free) blocks of a formatted slab, ascending."""
        slab = operator.index(slab)
        fmt = self._slab_fmt[slab] if 0 <= slab < self._num_slabs else None
        if fmt is None:
            raise ValueError(f"slab {slab} is not formatted")
        flags = self._live[slab]
        want = 1 if live else 0
        base = slab * fmt.per_slab
        return [base + i for i in range(fmt.per_slab) if flags[i] == want]

    def live_in_slab(self, slab: int) -> int:
        """Live blocks in a slab (0 for a free slab), O(1)."""
        return self._used[slab] if self._slab_fmt[slab] is not None else 0

    def slab_block_bytes(self, slab: int) -> int:
        """Block size a slab is formatted for, 0 if it is free (or the null slab)."""
        slab = operator.index(slab)
        if not 0 <= slab < self._num_slabs:
            raise ValueError(f"slab {slab} is outside the arena (0 <= slab < {self._num_slabs})")
        fmt = self._slab_fmt[slab]
        return fmt.block_bytes if fmt is not None else 0

    # --- allocate / free -------------------------------------------------------------------

    def allocate(self, block_bytes: int, num_blocks: int) -> List[int]:
        """Allocate `num_blocks` blocks of `block_bytes` bytes; all or nothing.

        Fills the fullest partially used slabs of this size first (so sparse slabs can
        drain and return to the free list), then formats free slabs (lowest id first).

        Returns: block ids (list[int], len num_blocks).
        Raises: OutOfKVMemory (allocator unchanged); ValueError on bad arguments.
        """
        num_blocks = operator.index(num_blocks)
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        fmt = self._lookup(block_bytes)  # validates block_bytes
        if fmt is None:
            # A format is created only by an allocation that succeeds (nothing changes else).
            block_bytes = operator.index(block_bytes)
            avail = len(self._free_slabs) * (self._slab_bytes // block_bytes)
        else:
            avail = (len(fmt.slabs) + len(self._free_slabs)) * fmt.per_slab - fmt.live
        if num_blocks > avail:
            raise OutOfKVMemory(operator.index(block_bytes), num_blocks, avail,
                                len(self._free_slabs), self._slab_bytes)
        if num_blocks == 0:
            return []
        if fmt is None:
            fmt = self._formats[block_bytes] = _Format(block_bytes, self._slab_bytes)
        per_slab = fmt.per_slab
        used = self._used
        heap = fmt.heap
        out: List[int] = []
        need = num_blocks
        while need:
            slab = self._fullest_partial(fmt)
            fresh = slab is None
            if fresh:
                slab = self._format_slab(fmt)
            k = per_slab - used[slab]
            if k > need:
                k = need
            self._take(slab, per_slab, k, out)
            u = used[slab] = used[slab] + k
            need -= k
            if fresh:
                if u < per_slab:
                    heapq.heappush(heap, (-u, slab))
            elif u < per_slab:
                # The top slab only got fuller, so it stays the heap minimum: O(1) update.
                heap[0] = (-u, slab)
            else:
                heapq.heappop(heap)
        fmt.live += num_blocks
        self._used_bytes += num_blocks * fmt.block_bytes
        return out

    def free(self, block_bytes: int, block_ids: Iterable[int]) -> None:
        """Free live blocks of this size; all or nothing.

        Raises ValueError (allocator unchanged) if an id is not a live block of this size,
        or appears twice in `block_ids`.
        """
        fmt = self._lookup(block_bytes)
        ids = [operator.index(i) for i in block_ids]
        if not ids:
            return
        if fmt is None:
            raise ValueError(
                f"cannot free block {ids[0]} of {block_bytes} B: no blocks of that size are live"
            )
        per_slab = fmt.per_slab
        slab_fmt, live = self._slab_fmt, self._live
        n_slabs = self._num_slabs
        # Validate everything before touching state (all or nothing).
        where = [divmod(b, per_slab) for b in ids]
        for b, (s, i) in zip(ids, where):
            if not (0 <= s < n_slabs and slab_fmt[s] is fmt and live[s][i]):
                raise ValueError(self._not_live_message(b, fmt))
        if len(ids) > 1 and len(set(ids)) != len(ids):
            dup = next(b for b in ids if ids.count(b) > 1)
            raise ValueError(f"block {dup} of {fmt.block_bytes} B appears twice in one free()")
        used, recycled = self._used, self._recycled
        touched = {}
        for s, i in where:
            live[s][i] = 0
            recycled[s].append(i)
            touched[s] = None
            used[s] -= 1
        heap = fmt.heap
        for s in touched:
            if used[s] == 0:
                self._release_slab(s, fmt)
            else:
                heapq.heappush(heap, (-used[s], s))
        fmt.live -= len(ids)
        self._used_bytes -= len(ids) * fmt.block_bytes
        if len(heap) > 2 * len(fmt.slabs) + 16:
            self._rebuild_heap(fmt)

    def relocate(self, block_bytes: int, moves: Sequence[Tuple[int, int]]) -> List[int]:
        """Bookkeeping of a block move (compaction): each `dst` becomes live, each `src` free.

        All or nothing: every src must be a distinct live block of this size and every dst a
        distinct free block inside a slab already formatted for this size. The data copy is
        the caller's (device) job. Returns the slabs that emptied and went back to the free
        list, ascending.
        """
        fmt = self._lookup(block_bytes)
        moves = [(operator.index(s), operator.index(d)) for s, d in moves]
        if not moves:
            return []
        if fmt is None:
            raise ValueError(f"no blocks of {block_bytes} B are live; nothing to relocate")
        per_slab, n_slabs = fmt.per_slab, self._num_slabs
        srcs = [s for s, _ in moves]
        dsts = [d for _, d in moves]
        if len(set(srcs)) != len(srcs) or len(set(dsts)) != len(dsts):
            raise ValueError("relocate: a source or destination block appears twice")
        for b in srcs:
            s, i = divmod(b, per_slab)
            if not (0 <= s < n_slabs and self._slab_fmt[s] is fmt and self._live[s][i]):
                raise ValueError("relocate source: " + self._not_live_message(b, fmt))
        for b in dsts:
            s, i = divmod(b, per_slab)
            if not (0 <= s < n_slabs and self._slab_fmt[s] is fmt):
                raise ValueError(
                    f"relocate destination {b}: slab {s} is not formatted for {block_bytes} B"
                )
            if self._live[s][i]:
                raise ValueError(f"relocate destination {b} of {block_bytes} B is live")
        touched = set()
        for src, dst in moves:
            s, i = divmod(src, per_slab)
            self._live[s][i] = 0
            touched.add(s)
            s, i = divmod(dst, per_slab)
            self._live[s][i] = 1
            touched.add(s)
        released = []
        for s in sorted(touched):
            # Moves land anywhere in a slab, so rebuild its free structure from the flags
            # (O(blocks per slab); compaction is rare).
            flags = self._live[s]
            used = sum(flags)
            self._used[s] = used
            if used == 0:
                self._release_slab(s, fmt)
                released.append(s)
                continue
            top = per_slab
            while not flags[top - 1]:
                top -= 1
            self._fresh[s] = top
            self._recycled[s] = [i for i in range(top - 1, -1, -1) if not flags[i]]
        self._rebuild_heap(fmt)
        return released

    # --- internals -------------------------------------------------------------------------

    def _check_block_bytes(self, block_bytes) -> int:
        block_bytes = _positive_int("block_bytes", block_bytes)
        if block_bytes > self._slab_bytes:
            raise ValueError(
                f"block_bytes {block_bytes} is larger than slab_bytes {self._slab_bytes}"
            )
        return block_bytes

    def _lookup(self, block_bytes):
        """The format of a validated block size, or None if none was created yet."""
        if type(block_bytes) is int:  # fast path: no validation needed for a known size
            fmt = self._formats.get(block_bytes)
            if fmt is not None:
                return fmt
        return self._formats.get(self._check_block_bytes(block_bytes))

    def _fullest_partial(self, fmt: _Format):
        """The valid heap top (fullest partially used slab), popping stale entries; or None."""
        heap, used, slab_fmt = fmt.heap, self._used, self._slab_fmt
        while heap:
            neg, s = heap[0]
            if slab_fmt[s] is fmt and used[s] == -neg and -neg < fmt.per_slab:
                return s
            heapq.heappop(heap)
        return None

    def _format_slab(self, fmt: _Format) -> int:
        s = heapq.heappop(self._free_slabs)
        last = self._last_fmt[s]
        if last is not None and last is not fmt:
            self.reformatted_slabs += 1  # memory moved between formats through the pool
        self._last_fmt[s] = fmt
        self._slab_fmt[s] = fmt
        self._used[s] = 0
        self._live[s] = bytearray(fmt.per_slab)
        self._recycled[s] = []
        self._fresh[s] = 0
        fmt.slabs.add(s)
        return s

    def _release_slab(self, s: int, fmt: _Format) -> None:
        """Return an empty slab to the free list (its heap entries go stale)."""
        fmt.slabs.discard(s)
        self._slab_fmt[s] = None
        self._live[s] = None
        self._recycled[s] = None
        self._fresh[s] = 0
        heapq.heappush(self._free_slabs, s)

    def _take(self, s: int, per_slab: int, k: int, out: List[int]) -> None:
        """Mark k free local blocks of slab s live and append their ids to out."""
        base = s * per_slab
        flags = self._live[s]
        rec = self._recycled[s]
        r = min(k, len(rec))
        for _ in range(r):
            i = rec.pop()
            flags[i] = 1
            out.append(base + i)
        k -= r
        if k:
            f = self._fresh[s]
            for i in range(f, f + k):
                flags[i] = 1
                out.append(base + i)
            self._fresh[s] = f + k

    def _rebuild_heap(self, fmt: _Format) -> None:
        used = self._used
        fmt.heap = [(-used[s], s) for s in fmt.slabs if used[s] < fmt.per_slab]
        heapq.heapify(fmt.heap)

    def _not_live_message(self, b: int, fmt: _Format) -> str:
        s = b // fmt.per_slab
        if not 0 <= s < self._num_slabs:
            where = f"outside the arena (ids of {fmt.block_bytes} B are < {self._num_slabs * fmt.per_slab})"
        elif s == 0:
            where = "in the null slab 0"
        elif self._slab_fmt[s] is None:
            where = f"in free slab {s}"
        elif self._slab_fmt[s] is not fmt:
            where = f"in slab {s}, formatted for {self._slab_fmt[s].block_bytes} B blocks"
        else:
            where = f"already free in slab {s}"
        return f"block {b} of {fmt.block_bytes} B is not live: {where}"

    def __repr__(self) -> str:
        return (
            f"SlabAllocator(num_slabs={self._num_slabs}, slab_bytes={self._slab_bytes}, "
            f"free_slabs={self.free_slabs}, used_bytes={self._used_bytes}, "
            f"formats={list(self.formats)})"
        )


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value

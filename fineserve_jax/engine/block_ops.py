"""Whole-block operations on the arena between steps: copy (compaction) and poison (debug).

Each is AOT-compiled once per block size for a fixed number of ids; shorter id lists are
padded with an out-of-range id, which the scatter drops, so nothing compiles after start-up.
"""

from __future__ import annotations

import functools
from typing import Dict, Iterable, Iterator, Sequence

import jax
import numpy as np

from fineserve_jax.formats import KVFormat
from fineserve_jax.kvslab import arena as arena_lib

_DROPPED = np.iinfo(np.int32).max


def padded_chunks(ids: Sequence[int], size: int) -> Iterator[np.ndarray]:
    """int32 arrays of exactly `size` ids, padded with an id the scatter drops."""
    for i in range(0, len(ids), size):
        out = np.full(size, _DROPPED, np.int32)
        part = ids[i : i + size]
        out[: len(part)] = part
        yield out


class BlockOps:
    """Compiled copy/poison of whole blocks, keyed by block size (ids of one size share
    one id space whatever model owns them, so any format of that size addresses them)."""

    def __init__(self, arena: jax.Array, formats: Iterable[KVFormat], chunk: int,
                 copy: bool, poison: bool):
        self.chunk = chunk
        sds = jax.ShapeDtypeStruct(arena.shape, arena.dtype)
        ids = jax.ShapeDtypeStruct((chunk,), np.int32)
        by_size: Dict[int, KVFormat] = {f.block_bytes: f for f in formats}
        self._copy, self._poison = {}, {}
        for b, fmt in by_size.items():
            if copy:
                fn = jax.jit(functools.partial(arena_lib.copy_blocks, fmt=fmt), donate_argnums=0)
                self._copy[b] = fn.lower(sds, src_block_ids=ids, dst_block_ids=ids).compile()
            if poison:
                fn = jax.jit(functools.partial(arena_lib.poison_blocks, fmt=fmt), donate_argnums=0)
                self._poison[b] = fn.lower(sds, block_ids=ids).compile()

    def copy(self, arena: jax.Array, block_bytes: int, src: Sequence[int], dst: Sequence[int]):
        """Copy blocks src[i] -> dst[i] (sources are all read before any write)."""
        for s, d in zip(padded_chunks(src, self.chunk), padded_chunks(dst, self.chunk)):
            arena = self._copy[block_bytes](arena, src_block_ids=s, dst_block_ids=d)
        return arena

    def poison(self, arena: jax.Array, block_bytes: int, ids: Sequence[int]):
        """Fill blocks with NaN bits (debug: a read of freed KV would show)."""
        for c in padded_chunks(ids, self.chunk):
            arena = self._poison[block_bytes](arena, block_ids=c)
        return arena

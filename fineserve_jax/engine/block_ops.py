"""Whole-block operations on the arena between steps: copy (compaction) and poison (debug).

Each is AOT-compiled once per block size for a fixed number of ids; shorter id lists are
padded with an out-of-range id, which the scatter drops, so nothing compiles after start-up.
On a tensor-parallel group every device applies the same ids to its part of the arena (a
block id means the same block on every device), under `shard_map`.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, Sequence

from typing import Optional

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from fineserve_jax.engine.sharding import AXIS, DeviceGroup
from fineserve_jax.engine.step_cache import compile_lowered
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
                 copy: bool, poison: bool, group: Optional[DeviceGroup] = None):
        """formats: the block formats of the arena (per device on a group)."""
        self.chunk = chunk
        placed = group is not None
        sds = jax.ShapeDtypeStruct(arena.shape, arena.dtype,
                                   sharding=arena.sharding if placed else None)
        ids = jax.ShapeDtypeStruct((chunk,), np.int32,
                                   sharding=group.replicated if placed else None)
        by_size: Dict[int, KVFormat] = {f.block_bytes: f for f in formats}
        self._copy, self._poison = {}, {}
        for b, fmt in by_size.items():
            if copy:
                fn = _per_device(lambda a, s, d, fmt=fmt: arena_lib.copy_blocks(a, fmt, s, d),
                                 group, 2)
                self._copy[b] = compile_lowered(fn.lower(sds, ids, ids))
            if poison:
                fn = _per_device(lambda a, ids, fmt=fmt: arena_lib.poison_blocks(a, fmt, ids),
                                 group, 1)
                self._poison[b] = compile_lowered(fn.lower(sds, ids))

    def copy(self, arena: jax.Array, block_bytes: int, src: Sequence[int], dst: Sequence[int]):
        """Copy blocks src[i] -> dst[i] (sources are all read before any write)."""
        for s, d in zip(padded_chunks(src, self.chunk), padded_chunks(dst, self.chunk)):
            arena = self._copy[block_bytes](arena, s, d)
        return arena

    def poison(self, arena: jax.Array, block_bytes: int, ids: Sequence[int]):
        """Fill blocks with NaN bits (debug: a read of freed KV would show)."""
        for c in padded_chunks(ids, self.chunk):
            arena = self._poison[block_bytes](arena, c)
        return arena


def _per_device(op, group: Optional[DeviceGroup], num_id_args: int):
    """jit of `op(arena, *ids)` with the arena donated; on a group of tp > 1 devices each
    device applies it to its own rows of the arena (its part of every block)."""
    if group is None:
        return jax.jit(op, donate_argnums=0)
    rows = group.arena_sharding
    if group.tp > 1:
        op = jax.shard_map(op, mesh=group.mesh, in_specs=(P(AXIS, None),) + (P(),) * num_id_args,
                           out_specs=P(AXIS, None))
    return jax.jit(op, donate_argnums=0, in_shardings=(rows,) + (group.replicated,) * num_id_args,
                   out_shardings=rows)

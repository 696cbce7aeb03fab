"""Synthetic paged-KV scenarios for the kernel tests and the kernel benchmark.

A scenario is an arena holding the K/V of a batch of sequences of one format: blocks come
from the real host allocator (`SlabAllocator`), are handed to the sequences in a random
permutation, and unused block-table entries point at the null block 0. The true
(unquantized) K/V are returned too, so that tests can compare against attention over them.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.formats import KVFormat
from fineserve_jax.kvslab import SlabAllocator
from fineserve_jax.kvslab import arena as arena_lib
from pallas_kernels.triton_compat import resolve_interpret

# Pallas kernels run compiled on a GPU and interpreted elsewhere (the same tests, both ways).
INTERPRET = resolve_interpret(None)
# The C++ kernel (impl "cpu") runs on the CPU backend only.
needs_cpu_kernel = pytest.mark.skipif(jax.default_backend() != "cpu",
                                      reason="the C++ attention kernel runs on the CPU backend")

__all__ = ["INTERPRET", "needs_cpu_kernel",
           "PagedBatch", "allocate_tables", "write_tokens", "write_sequences",
           "make_paged_batch", "foreign_blocks", "prefill_queries"]


@dataclasses.dataclass
class PagedBatch:
    """fmt; arena uint32 `[slabs, slab_words]`; block_tables int32 `[B, W]`; lengths int32
    `[B]`; kv: {layer: (k, v)} true values float32 `[B, W * tokens, kv_heads, head_dim]`
    (zeros past each length); owned: the block ids the batch owns."""

    fmt: KVFormat
    arena: jax.Array
    block_tables: np.ndarray
    lengths: np.ndarray
    kv: Dict[int, Tuple[np.ndarray, np.ndarray]]
    owned: np.ndarray

    @property
    def view(self) -> jax.Array:
        return arena_lib.typed_view(self.arena, self.fmt)


def allocate_tables(allocator: SlabAllocator, fmt: KVFormat, lengths: Sequence[int],
                    width: int, rng: np.random.Generator) -> np.ndarray:
    """Allocate blocks for each sequence, in a random permutation; pad rows with block 0."""
    need = [fmt.blocks_for_tokens(int(n)) for n in lengths]
    if max(need, default=0) > width:
        raise ValueError(f"width {width} < {max(need)} blocks needed")
    ids = np.array(allocator.allocate(fmt.block_bytes, sum(need)), np.int32)
    ids = rng.permutation(ids)
    tables = np.zeros((len(lengths), width), np.int32)
    start = 0
    for b, nb in enumerate(need):
        tables[b, :nb] = ids[start:start + nb]
        start += nb
    return tables


def _token_slots(fmt: KVFormat, tables: np.ndarray, lengths: np.ndarray):
    """(batch index, position, slot_block, slot_offset) of every written token."""
    t = fmt.tokens_per_block
    bi, pi = np.nonzero(np.arange(tables.shape[1] * t)[None, :] < np.asarray(lengths)[:, None])
    return bi, pi, tables[bi, pi // t].astype(np.int32), (pi % t).astype(np.int32)


_write = jax.jit(arena_lib.write_kv, static_argnums=(1, 2), donate_argnums=(0,))


def write_tokens(arena: jax.Array, fmt: KVFormat, layer: int, tables: np.ndarray,
                 lengths: np.ndarray, k: np.ndarray, v: np.ndarray, dtype=jnp.float32):
    """Store given K/V `[B, W * tokens, H, D]` (positions < length) of one layer."""
    bi, pi, slot_block, slot_offset = _token_slots(fmt, tables, lengths)
    return _write(arena, fmt, layer, jnp.asarray(k[bi, pi], dtype), jnp.asarray(v[bi, pi], dtype),
                  jnp.asarray(slot_block), jnp.asarray(slot_offset))


def write_sequences(arena: jax.Array, fmt: KVFormat, tables: np.ndarray, lengths: np.ndarray,
                    rng: np.random.Generator, layers: Optional[Sequence[int]] = None,
                    dtype=jnp.float32):
    """Write random unit-normal K/V for every token of every sequence, layer by layer.

    Returns (arena, {layer: (k, v)}), k/v float32 `[B, W * tokens, H, D]` (the values as
    stored before quantization, i.e. after the cast to `dtype`; zeros past each length).
    """
    b, width = tables.shape
    shape = (b, width * fmt.tokens_per_block, fmt.num_kv_heads, fmt.head_dim)
    valid = (np.arange(shape[1])[None, :] < np.asarray(lengths)[:, None])[..., None, None]
    out = {}
    for layer in (range(fmt.num_layers) if layers is None else layers):
        kv = rng.standard_normal((2, *shape)).astype(np.float32) * valid
        kv = np.asarray(jnp.asarray(kv, dtype).astype(jnp.float32))
        arena = write_tokens(arena, fmt, layer, tables, lengths, kv[0], kv[1], dtype)
        out[layer] = (kv[0], kv[1])
    return arena, out


def make_paged_batch(fmt: KVFormat, lengths: Sequence[int], *, width: Optional[int] = None,
                     seed: int = 0, spare_slabs: int = 2, layers=None,
                     dtype=jnp.float32) -> PagedBatch:
    """A fresh arena (only this format) holding `lengths` sequences of random K/V."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    need = [fmt.blocks_for_tokens(int(n)) for n in lengths]
    width = max(1, max(need, default=1)) if width is None else width
    slab_bytes = fmt.block_bytes * 4
    num_slabs = 1 + -(-sum(need) // 4) + spare_slabs
    alloc = SlabAllocator(num_slabs, slab_bytes)
    tables = allocate_tables(alloc, fmt, lengths, width, rng)
    arena = arena_lib.make_arena(num_slabs, slab_bytes)
    arena, kv = write_sequences(arena, fmt, tables, lengths, rng, layers=layers, dtype=dtype)
    owned = np.unique(tables[tables > 0])
    return PagedBatch(fmt, arena, tables, lengths, kv, owned)


def foreign_blocks(num_blocks: int, owned: np.ndarray) -> np.ndarray:
    """Every block id of a view of `num_blocks` that is not in `owned` (the null block too)."""
    return np.setdiff1d(np.arange(num_blocks, dtype=np.int32), owned).astype(np.int32)


def prefill_queries(lengths: np.ndarray, chunk: Sequence[int], pad: int, num_heads: int,
                    head_dim: int, rng: np.random.Generator, dtype=jnp.float32):
    """Packed prefill queries: the last `chunk[b]` tokens of each sequence (a chunk after a
    prefix already in the arena), then `pad` padding tokens (q_seq 0, q_pos -1).

    Returns (q `[N, Hq, D]`, q_seq int32 `[N]`, q_pos int32 `[N]`).
    """
    seqs, poss = [], []
    for b, (n, c) in enumerate(zip(lengths, chunk)):
        c = min(int(c), int(n))
        seqs += [b] * c
        poss += list(range(int(n) - c, int(n)))
    seqs += [0] * pad
    poss += [-1] * pad
    q = rng.standard_normal((len(seqs), num_heads, head_dim)).astype(np.float32)
    return (jnp.asarray(q, dtype), jnp.asarray(np.array(seqs, np.int32)),
            jnp.asarray(np.array(poss, np.int32)))


# --- deliberate mutations: comparisons against the reference must reject these ----------

def shifted_tables(tables: np.ndarray) -> np.ndarray:
    """Off-by-one block ids (every owned entry + 1): reads a neighbour's (or empty) block."""
    return np.where(tables > 0, tables + 1, 0).astype(np.int32)


def kv_swapped_arena(batch: PagedBatch, layer: int) -> jax.Array:
    """A copy of the batch's arena with K and V of `layer` stored swapped."""
    k, v = batch.kv[layer]
    arena = jnp.array(batch.arena, copy=True)
    return write_tokens(arena, batch.fmt, layer, batch.block_tables, batch.lengths, v, k)


def greedy_by_full_forward(model, prompt, n, width=128):
    """Greedy decoding by repeated full causal forwards (`Model.logits` with the preset's KV
    round trip): the reference the engine's greedy tokens are compared with. The sequence is
    right-padded to a fixed width (causality makes the padding invisible) so it compiles once."""
    ids = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(ids)] = ids
        logits = np.asarray(model.logits(padded, kv_dtype=model.preset.kv))
        ids.append(int(np.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]

"""Device arena: typed views, KV write/read, block copy and poisoning, in-place updates,
several formats sharing one arena, isolation of sequences (reference attention)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.formats import KV_DTYPES, KVFormat
from fineserve_jax.kvslab import SlabAllocator, block_byte_offset
from fineserve_jax.kvslab import arena as A
from fineserve_jax.formats.kv_codec import dequantize_kv_rows, quantize_kv_rows
from pallas_kernels import decode_attention, masked_attention, prefill_attention
import kernel_testing as T

# Attention over quantized K/V vs over the true K/V (unit-normal K, V, q; head_dim 16):
# a sanity bound on the size of the quantization effect, per dtype.
QUANT_ATOL = {"bf16": 1.5e-2, "fp8": 0.15, "int8": 3e-2, "int4": 0.3}


def _fmt(kv_dtype, layers=2, heads=2, d=16, t=4):
    return KVFormat(num_layers=layers, num_kv_heads=heads, head_dim=d, kv_dtype=kv_dtype,
                    tokens_per_block=t)


def _roundtrip(x, kv_dtype):
    d, s = quantize_kv_rows(jnp.asarray(x), kv_dtype)
    return np.asarray(dequantize_kv_rows(d, s, kv_dtype, x.shape[-1]))


def test_make_arena_and_views():
    fmt = _fmt("int8")
    arena = A.make_arena(3, fmt.block_bytes * 5)
    assert arena.shape == (3, fmt.block_words * 5) and arena.dtype == jnp.uint32
    assert not np.any(np.asarray(arena))
    view = A.typed_view(arena, fmt)
    assert view.shape == (15, fmt.block_words)
    assert A.from_view(view, arena.shape).shape == arena.shape
    with pytest.raises(ValueError, match="multiple of 4"):
        A.make_arena(2, 1026)
    with pytest.raises(ValueError, match="not a multiple"):
        A.typed_view(A.make_arena(2, fmt.block_bytes * 5 + 4), fmt)


def test_view_rows_are_allocator_block_ids():
    fmts = [_fmt("bf16"), _fmt("int4", layers=1)]
    slab_bytes = int(np.lcm(fmts[0].block_bytes, fmts[1].block_bytes)) * 2
    alloc = SlabAllocator(4, slab_bytes)
    arena = A.make_arena(4, slab_bytes)
    flat = np.arange(arena.size, dtype=np.uint32).reshape(arena.shape)
    arena = jnp.asarray(flat)
    for fmt in fmts:
        view = np.asarray(A.typed_view(arena, fmt))
        for bid in alloc.allocate(fmt.block_bytes, 3):
            off = block_byte_offset(bid, fmt.block_bytes, slab_bytes) // 4
            np.testing.assert_array_equal(view[bid], flat.ravel()[off:off + fmt.block_words])


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_write_read_roundtrip_and_nothing_else_changes(kv_dtype):
    fmt = _fmt(kv_dtype)
    arena = A.make_arena(2, fmt.block_bytes * 4)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, 2, 16)).astype(np.float32)
    v = rng.standard_normal((3, 2, 16)).astype(np.float32)
    blocks, offs = np.array([5, 2, 5], np.int32), np.array([3, 0, 1], np.int32)
    arena = A.write_kv(arena, fmt, 1, jnp.asarray(k), jnp.asarray(v), jnp.asarray(blocks),
                       jnp.asarray(offs))
    rk, rv = A.read_kv(arena, fmt, 1, jnp.asarray([5, 2]))
    for i, (b, o) in enumerate(zip(blocks, offs)):
        j = 0 if b == 5 else 1
        np.testing.assert_array_equal(np.asarray(rk[j, o]), _roundtrip(k[i], kv_dtype))
        np.testing.assert_array_equal(np.asarray(rv[j, o]), _roundtrip(v[i], kv_dtype))
    # Exactly the words of those rows changed: layer 0 and every other block still zero.
    lk, lv = A.read_kv(arena, fmt, 0, jnp.arange(8))
    assert not np.any(np.asarray(lk)) and not np.any(np.asarray(lv))
    view = np.asarray(A.typed_view(arena, fmt))
    assert not np.any(np.delete(view, [2, 5], axis=0))
    rows_per_token = 2 * fmt.num_kv_heads
    assert np.count_nonzero(view) <= 3 * rows_per_token * (fmt.data_words + fmt.scale_words)


def _compiled(fn, *args, **static):
    return jax.jit(functools.partial(fn, **static), donate_argnums=(0,)).lower(*args).compile()


@pytest.mark.parametrize("op", ["write_kv", "copy_blocks", "poison_blocks"])
def test_updates_are_in_place_when_donated(op):
    fmt = _fmt("fp8")
    arena = A.make_arena(64, fmt.block_bytes * 8)  # 512 blocks, ~0.6 MiB
    arena_bytes = arena.size * 4
    if op == "write_kv":
        k = jnp.ones((4, 2, 16), jnp.bfloat16)
        args = (arena, k, k, jnp.array([9, 9, 0, 0], jnp.int32), jnp.array([0, 1, 0, 0], jnp.int32))
        fn = lambda a, k, v, b, o: A.write_kv(a, fmt, 1, k, v, b, o)
    elif op == "copy_blocks":
        args = (arena, jnp.array([3, 4], jnp.int32), jnp.array([10, 11], jnp.int32))
        fn = lambda a, s, d: A.copy_blocks(a, fmt, s, d)
    else:
        args = (arena, jnp.array([3, 4], jnp.int32))
        fn = lambda a, b: A.poison_blocks(a, fmt, b)
    compiled = _compiled(fn, *args)
    hlo = compiled.as_text()
    assert "input_output_alias" in hlo  # output 0 aliases the donated arena
    mem = compiled.memory_analysis()
    if mem is not None:  # no arena-sized temporary
        assert mem.temp_size_in_bytes < arena_bytes // 8, mem
    ptr = arena.unsafe_buffer_pointer()
    out = compiled(*args)
    assert arena.is_deleted()
    assert out.unsafe_buffer_pointer() == ptr


def test_copy_blocks_reads_all_sources_first():
    fmt = _fmt("int8")
    arena = A.make_arena(2, fmt.block_bytes * 4)
    view = np.arange(8 * fmt.block_words, dtype=np.uint32).reshape(8, -1)
    arena = A.from_view(jnp.asarray(view), arena.shape)
    out = np.asarray(A.typed_view(A.copy_blocks(arena, fmt, [1, 2, 6], [2, 1, 7]), fmt))
    want = view.copy()
    want[[2, 1, 7]] = view[[1, 2, 6]]
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_poison_makes_every_dtype_nan(kv_dtype):
    fmt = _fmt(kv_dtype)
    arena = A.poison_blocks(A.make_arena(2, fmt.block_bytes * 4), fmt, [3])
    k, v = A.read_kv(arena, fmt, 1, jnp.array([3, 4]))
    assert np.all(np.isnan(np.asarray(k[0]))) and np.all(np.isnan(np.asarray(v[0])))
    assert not np.any(np.isnan(np.asarray(k[1])))


# --- several formats in one arena ------------------------------------------------------

MIXED = [  # different layer counts, heads, dtypes and block sizes sharing slabs
    KVFormat(2, 2, 16, "bf16", 4),
    KVFormat(1, 2, 16, "int8", 4),
    KVFormat(3, 1, 16, "int4", 8),
    KVFormat(1, 1, 32, "fp8", 4),
]
# Lengths at block boundaries +-1 (block 4 or 8 tokens), a 1-token and a padded (0) row.
MIXED_LENGTHS = [[3, 4, 5, 8, 1, 0], [7, 8, 9, 12], [15, 16, 17, 1], [4, 5, 11, 0, 13]]


def _mixed_arena():
    block_bytes = [f.block_bytes for f in MIXED]
    slab_bytes = int(np.lcm.reduce(block_bytes))
    alloc = SlabAllocator(24, slab_bytes)
    arena = A.make_arena(24, slab_bytes)
    rng = np.random.default_rng(1)
    tables = [T.allocate_tables(alloc, f, n, 6, rng) for f, n in zip(MIXED, MIXED_LENGTHS)]
    kv = [dict() for _ in MIXED]
    # Interleave the writes: layer by layer, format by format.
    for layer in range(max(f.num_layers for f in MIXED)):
        for i, f in enumerate(MIXED):
            if layer < f.num_layers:
                arena, out = T.write_sequences(arena, f, tables[i], np.array(MIXED_LENGTHS[i]),
                                               rng, layers=[layer])
                kv[i].update(out)
    slabs = {alloc.slab_of(f.block_bytes, int(b)) for f, t in zip(MIXED, tables)
             for b in t[t > 0]}
    assert len(slabs) >= len(MIXED)  # really several formatted slabs side by side
    return arena, tables, kv


def test_mixed_formats_share_an_arena():
    arena, tables, kv = _mixed_arena()
    rng = np.random.default_rng(2)
    for f, tab, lengths, kvf in zip(MIXED, tables, MIXED_LENGTHS, kv):
        lengths = np.array(lengths, np.int32)
        view = A.typed_view(arena, f)
        hq = f.num_kv_heads * 2
        q = jnp.asarray(rng.standard_normal((len(lengths), hq, f.head_dim)), jnp.float32)
        for layer in range(f.num_layers):
            k, v = kvf[layer]
            got = decode_attention(q, view, jnp.asarray(tab), jnp.asarray(lengths), fmt=f,
                                   layer=layer)
            qpos = jnp.asarray(lengths - 1)
            exact = masked_attention(q, jnp.asarray(_roundtrip(k, f.kv_dtype)),
                                     jnp.asarray(_roundtrip(v, f.kv_dtype)), qpos)
            true = masked_attention(q, jnp.asarray(k), jnp.asarray(v), qpos)
            np.testing.assert_allclose(np.asarray(got), np.asarray(exact), atol=2e-5, rtol=1e-5)
            np.testing.assert_allclose(np.asarray(got), np.asarray(true),
                                       atol=QUANT_ATOL[f.kv_dtype])
            np.testing.assert_array_equal(np.asarray(got)[lengths == 0], 0.0)


def test_isolation_reference_all_dtypes():
    """NaN in every block a format's sequences do not own (including the null block and
    the other formats' slabs) leaves their attention bit-identical."""
    arena, tables, _ = _mixed_arena()
    rng = np.random.default_rng(3)
    for f, tab, lengths in zip(MIXED, tables, MIXED_LENGTHS):
        lengths = jnp.asarray(np.array(lengths, np.int32))
        tab = jnp.asarray(tab)
        view = A.typed_view(arena, f)
        q = jnp.asarray(rng.standard_normal((len(lengths), f.num_kv_heads, f.head_dim)),
                        jnp.float32)
        before = decode_attention(q, view, tab, lengths, fmt=f, layer=0)
        foreign = T.foreign_blocks(view.shape[0], np.unique(np.asarray(tab)[np.asarray(tab) > 0]))
        poisoned = A.typed_view(A.poison_blocks(arena, f, foreign), f)
        after = decode_attention(q, poisoned, tab, lengths, fmt=f, layer=0)
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
        assert np.all(np.isfinite(np.asarray(after)))


def test_prefill_reference_matches_decode_per_token():
    fmt = _fmt("int8", layers=1)
    batch = T.make_paged_batch(fmt, [5, 9], width=3, seed=4)
    rng = np.random.default_rng(5)
    q, q_seq, q_pos = T.prefill_queries(batch.lengths, [5, 4], 2, 4, 16, rng)
    got = prefill_attention(q, batch.view, jnp.asarray(batch.block_tables), q_seq, q_pos,
                            fmt=fmt, layer=0)
    np.testing.assert_array_equal(np.asarray(got)[-2:], 0.0)  # padding tokens
    for i in range(q.shape[0] - 2):
        b, p = int(q_seq[i]), int(q_pos[i])
        one = decode_attention(q[i:i + 1], batch.view, jnp.asarray(batch.block_tables[b:b + 1]),
                               jnp.array([p + 1], jnp.int32), fmt=fmt, layer=0)
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(one[0]), atol=1e-6)


def test_engine_like_step_updates_arena_in_place():
    """Per layer: write the new token's K/V, then attend over the view; arena donated.

    As in a transformer, layer l+1's K/V depend on layer l's attention output: that data
    dependency is what lets XLA order layer l's reads before layer l+1's in-place write.
    (Without it, XLA's copy insertion copies the whole arena between the two: measured with
    JAX 0.10.2 on CPU; see WORKSPACE_NOTES.md "Device arena".)
    """
    fmt = _fmt("int4", layers=3)
    arena = A.make_arena(32, fmt.block_bytes * 8)

    def step(arena, q, k, v, tables, lengths, slot_block, slot_offset):
        outs = []
        for layer in range(fmt.num_layers):
            if outs:
                k = k + outs[-1][:, :fmt.num_kv_heads, :]
            arena = A.write_kv(arena, fmt, layer, k, v, slot_block, slot_offset)
            outs.append(decode_attention(q, A.typed_view(arena, fmt), tables, lengths, fmt=fmt,
                                         layer=layer))
        return arena, outs

    q = jnp.ones((2, 4, 16), jnp.float32)
    k = jnp.ones((2, 2, 16), jnp.float32)
    args = (arena, q, k, k, jnp.array([[3, 4], [5, 0]], jnp.int32), jnp.array([6, 1], jnp.int32),
            jnp.array([4, 5], jnp.int32), jnp.array([1, 0], jnp.int32))
    compiled = jax.jit(step, donate_argnums=(0,)).lower(*args).compile()
    assert "input_output_alias" in compiled.as_text()
    mem = compiled.memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes < arena.size * 4 // 8, mem
    ptr = arena.unsafe_buffer_pointer()
    new_arena, outs = compiled(*args)
    assert new_arena.unsafe_buffer_pointer() == ptr
    assert all(np.all(np.isfinite(np.asarray(o))) for o in outs)

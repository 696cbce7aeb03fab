"""Prefill attention implementations vs the jnp reference (Pallas in interpret mode on CPU).

Queries are chunks at the end of sequences whose prefix is already in the arena (chunked
prefill / prefix reuse), packed back to back, followed by padding tokens (q_pos -1). As for
decode: NaN in every foreign block, a traced layer, and mutants (off-by-one tables, K/V
swapped, another layer) that the comparison must reject.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.formats import KVFormat
from fineserve_jax.kvslab import arena as A
from pallas_kernels import prefill_attention
import kernel_testing as T
from pallas_kernels.prefill_triton import prefill_attention_triton
from pallas_kernels.query_tiles import query_tiles
from pallas_kernels.cpu.attention import prefill_attention_cpu
from pallas_kernels.xla_attention import prefill_attention_xla

ATOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _impl_fn(impl, fmt, q_tile, blocks_per_step, defines=()):
    """The implementation under test with a runtime (traced) layer argument."""
    if impl == "cpu":
        fn = functools.partial(prefill_attention_cpu, fmt=fmt, defines=defines)
    elif impl == "pallas_triton":
        fn = functools.partial(prefill_attention_triton, fmt=fmt, interpret=T.INTERPRET,
                               q_tile=q_tile, blocks_per_step=blocks_per_step)
    else:
        fn = functools.partial(prefill_attention_xla, fmt=fmt, q_tile=q_tile,
                               blocks_per_step=blocks_per_step)
    return jax.jit(lambda q, view, tables, q_seq, q_pos, layer: fn(q, view, tables, q_seq, q_pos,
                                                                   layer=layer))


def _run_case(kv_dtype, hq, hkv, d, t, lengths, chunks, pad, width, q_tile, blocks_per_step,
              q_dtype=jnp.float32, seed=0, impl="pallas_triton", defines=()):
    fmt = KVFormat(num_layers=2, num_kv_heads=hkv, head_dim=d, kv_dtype=kv_dtype,
                   tokens_per_block=t)
    batch = T.make_paged_batch(fmt, lengths, width=width, seed=seed)
    rng = np.random.default_rng(seed + 1)
    q, q_seq, q_pos = T.prefill_queries(batch.lengths, chunks, pad, hq, d, rng, q_dtype)
    tables = jnp.asarray(batch.block_tables)
    layer = 1
    kernel = _impl_fn(impl, fmt, q_tile, blocks_per_step, defines)
    run = lambda view, tab, lay=layer: np.asarray(  # noqa: E731
        kernel(q, view, tab, q_seq, q_pos, jnp.int32(lay)).astype(jnp.float32))

    ref = np.asarray(prefill_attention(q, batch.view, tables, q_seq, q_pos, fmt=fmt, layer=layer)
                     .astype(jnp.float32))
    foreign = T.foreign_blocks(batch.view.shape[0], batch.owned)
    poisoned = A.typed_view(A.poison_blocks(batch.arena, fmt, foreign), fmt)
    out = kernel(q, poisoned, tables, q_seq, q_pos, jnp.int32(layer))
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out.astype(jnp.float32))
    atol = ATOL[q_dtype]
    np.testing.assert_allclose(out, ref, atol=atol, rtol=atol)
    np.testing.assert_array_equal(out[np.asarray(q_pos) < 0], 0.0)

    shifted = run(batch.view, jnp.asarray(T.shifted_tables(batch.block_tables)))
    swapped = run(A.typed_view(T.kv_swapped_arena(batch, layer), fmt), tables)
    other_layer = run(batch.view, tables, 0)
    for bad in (shifted, swapped, other_layer):
        assert np.all(np.isfinite(bad))
        assert np.max(np.abs(bad - ref)) > 20 * atol


# (kv_dtype, Hq, Hkv, D, tokens/block, lengths, chunk per seq, pad, width, q_tile, blocks/step)
CASES = {
    "bf16-mha-full-prompts": ("bf16", 2, 2, 16, 4, [5, 9, 4], [5, 9, 4], 3, 3, 4, 1),
    "fp8-gqa4-chunks": ("fp8", 8, 2, 16, 8, [8, 17, 3], [8, 6, 1], 2, 3, 2, 2),
    "int8-gqa8-prefix-reuse": ("int8", 8, 1, 32, 4, [12, 1, 7, 0], [5, 1, 7, 0], 1, 3, 4, 2),
    "int4-gqa4-one-tile": ("int4", 4, 1, 16, 4, [9, 4], [9, 2], 0, 3, 8, 1),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_prefill_kernel_matches_reference(case):
    _run_case(*CASES[case])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_prefill_xla_matches_reference(case):
    _run_case(*CASES[case], impl="xla")


@T.needs_cpu_kernel
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_prefill_cpu_kernel_matches_reference(case):
    _run_case(*CASES[case], impl="cpu")


@T.needs_cpu_kernel
def test_prefill_cpu_kernel_odd_blocks_and_mutant():
    """6 tokens per block and chunked prompts; the kernel built to skip each row's last
    position (the query's own token in prefill) must fail the same comparison."""
    case = ("fp8", 8, 2, 16, 6, [13, 7, 1], [13, 4, 1], 2, 4, 3, 3)
    _run_case(*case, impl="cpu")
    with pytest.raises(AssertionError):
        _run_case(*case, impl="cpu", defines=("FINESERVE_MUTATE_DROP_LAST_POSITION",))


def test_prefill_xla_odd_tiles_and_block_steps():
    """q tiles of 3 tokens, 3 blocks per step, 6 tokens per block (no power-of-2 needed)."""
    _run_case("fp8", 8, 2, 16, 6, [13, 7, 1], [13, 4, 1], 2, 4, 3, 3, impl="xla")


def test_prefill_kernel_bf16_queries_dot_path():
    """q_tile 16 x group 1 rows and 16-word planes: the tl.dot path, bf16 in and out."""
    _run_case("bf16", 2, 2, 32, 8, [20, 33], [20, 17], 2, 5, 16, 2, q_dtype=jnp.bfloat16)


def test_query_tiles_never_straddle_sequences():
    q_seq = jnp.array([0, 0, 0, 0, 0, 2, 2, 3, 0, 0], jnp.int32)
    q_pos = jnp.array([3, 4, 5, 6, 7, 0, 1, 9, -1, -1], jnp.int32)
    seq, row0, rows = map(np.asarray, query_tiles(q_seq, q_pos, 4, 4))
    live = rows > 0
    assert list(zip(seq[live], row0[live], rows[live])) == [(0, 0, 4), (0, 4, 1), (2, 5, 2),
                                                            (3, 7, 1)]
    assert len(seq) == 10 // 4 + 1 + 4


@pytest.mark.slow
@pytest.mark.parametrize("kv_dtype,group,t,q_tile", list(itertools.product(
    ["bf16", "fp8", "int8", "int4"], [1, 4, 8], [4, 8], [2, 8])))
def test_prefill_full_product(kv_dtype, group, t, q_tile):
    lengths = [t - 1, t, t + 1, 3 * t + 2]
    chunks = [t - 1, 2, t + 1, t]
    _run_case(kv_dtype, 2 * group, 2, 16, t, lengths, chunks, 2, 4, q_tile, 2)
    _run_case(kv_dtype, 2 * group, 2, 16, t, lengths, chunks, 2, 4, q_tile, 1, impl="xla")
    if jax.default_backend() == "cpu":
        _run_case(kv_dtype, 2 * group, 2, 16, t, lengths, chunks, 2, 4, q_tile, 1, impl="cpu")


def _bucket_rows(q_tile_for):
    """One sequence's 13 query rows packed alone in 16- and 24-token buckets and in a
    64-token bucket (padding after them): the outputs of its rows, bit for bit, per bucket.
    SmolLM2's heads (9 query / 3 KV heads of 64), bf16 KV of 60 tokens."""
    fmt = KVFormat(num_layers=1, num_kv_heads=3, head_dim=64, kv_dtype="bf16", tokens_per_block=16)
    batch = T.make_paged_batch(fmt, [60], seed=3)
    outs = []
    for n in (16, 24, 64):
        q, q_seq, q_pos = T.prefill_queries(batch.lengths, [13], n - 13, 9, 64,
                                            rng=np.random.default_rng(5))
        out = prefill_attention_xla(q, batch.view, jnp.asarray(batch.block_tables), q_seq, q_pos,
                                    fmt=fmt, layer=0, q_tile=q_tile_for(n))
        outs.append(np.asarray(out)[:13].view(np.uint32))
    return outs


def test_prefill_xla_rows_do_not_depend_on_the_bucket():
    """Batch invariance (issue 12): a prompt's attention output must not depend on how many
    tokens share its prefill step, or quantized activations turn last-bit differences into
    different tokens (measured on SmolLM2 fp8: 2 of 4 prompts alone != batched before)."""
    *smaller, large = _bucket_rows(lambda n: 32)
    for small in smaller:
        np.testing.assert_array_equal(small, large)
    # Mutation: a query tile that shrinks with the bucket (the old `min(q_tile, n)`) changes
    # the per-tile shapes and with them XLA's summation order. Which tile widths change it
    # depends on the CPU (16 vs 32 rows did on an AVX-512 Xeon; on an AVX2 EPYC 16 vs 32
    # gave the same bits and 24 vs 32 did not), so two smaller buckets are checked.
    *smaller, large = _bucket_rows(lambda n: min(32, n))
    assert any(np.any(small != large) for small in smaller)

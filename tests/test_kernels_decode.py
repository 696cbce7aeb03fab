"""Decode attention implementations vs the jnp reference (Pallas in interpret mode on CPU).

Every case runs the implementation on an arena whose foreign blocks (every block the batch
does not own, the null block included) are NaN, and compares with the reference on the clean
arena; deliberately wrong inputs (off-by-one block table, K and V swapped, another layer)
must be rejected by the same comparison, so the tolerance is known not to be vacuous. The
layer is passed as a traced int32 (as inside the decoder's layer scan); the reference gets it
as a Python int.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.formats import KVFormat
from fineserve_jax.formats import kv_layout
from fineserve_jax.kvslab import arena as A
from pallas_kernels import decode_attention, resolve_impl, xla_attention
import kernel_testing as T
from pallas_kernels.decode_triton import decode_attention_triton
from pallas_kernels.cpu import build as cpu_build
from pallas_kernels.cpu.attention import decode_attention_cpu
from pallas_kernels.xla_attention import decode_attention_xla

ATOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _impl_fn(impl, fmt, num_splits, blocks_per_step, min_group_rows, defines=()):
    """The implementation under test with a runtime (traced) layer argument."""
    if impl == "cpu":
        fn = functools.partial(decode_attention_cpu, fmt=fmt, defines=defines)
    elif impl == "pallas_triton":
        fn = functools.partial(decode_attention_triton, fmt=fmt, interpret=T.INTERPRET,
                               num_splits=num_splits, blocks_per_step=blocks_per_step,
                               min_group_rows=min_group_rows)
    else:
        fn = functools.partial(decode_attention_xla, fmt=fmt, blocks_per_step=blocks_per_step)
    return jax.jit(lambda q, view, tables, lens, layer: fn(q, view, tables, lens, layer=layer))


def _run_case(kv_dtype, hq, hkv, d, t, lengths, width, num_splits, blocks_per_step,
              min_group_rows, q_dtype=jnp.float32, seed=0, impl="pallas_triton", defines=()):
    fmt = KVFormat(num_layers=2, num_kv_heads=hkv, head_dim=d, kv_dtype=kv_dtype,
                   tokens_per_block=t)
    batch = T.make_paged_batch(fmt, lengths, width=width, seed=seed)
    rng = np.random.default_rng(seed + 1)
    q = jnp.asarray(rng.standard_normal((len(lengths), hq, d)), q_dtype)
    tables, lens = jnp.asarray(batch.block_tables), jnp.asarray(batch.lengths)
    layer = 1
    kernel = _impl_fn(impl, fmt, num_splits, blocks_per_step, min_group_rows, defines)
    run = lambda view, tab, lay=layer: np.asarray(  # noqa: E731
        kernel(q, view, tab, lens, jnp.int32(lay)).astype(jnp.float32))

    ref = np.asarray(decode_attention(q, batch.view, tables, lens, fmt=fmt, layer=layer)
                     .astype(jnp.float32))
    foreign = T.foreign_blocks(batch.view.shape[0], batch.owned)
    poisoned = A.typed_view(A.poison_blocks(batch.arena, fmt, foreign), fmt)
    out = kernel(q, poisoned, tables, lens, jnp.int32(layer))
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out.astype(jnp.float32))
    atol = ATOL[q_dtype]
    np.testing.assert_allclose(out, ref, atol=atol, rtol=atol)
    np.testing.assert_array_equal(out[np.asarray(lengths) == 0], 0.0)  # padded rows

    # Mutants (on the clean arena, so their outputs are finite and only wrong).
    shifted = run(batch.view, jnp.asarray(T.shifted_tables(batch.block_tables)))
    swapped = run(A.typed_view(T.kv_swapped_arena(batch, layer), fmt), tables)
    other_layer = run(batch.view, tables, 0)
    for bad in (shifted, swapped, other_layer):
        assert np.all(np.isfinite(bad))
        assert np.max(np.abs(bad - ref)) > 20 * atol


# (kv_dtype, Hq, Hkv, head_dim, tokens/block, lengths, width, splits, blocks/step, min rows)
CASES = {
    "bf16-mha-boundaries": ("bf16", 2, 2, 16, 4, [1, 3, 4, 5, 0], 3, 1, 1, 1),
    "fp8-gqa4-split2": ("fp8", 8, 2, 16, 8, [7, 8, 9, 20, 0], 4, 2, 1, 1),
    "int8-gqa8-2blocks-per-step": ("int8", 8, 1, 32, 4, [4, 5, 3, 13, 0], 4, 3, 2, 1),
    "int4-gqa4-ragged-width": ("int4", 4, 1, 16, 4, [17, 1, 8, 0], 5, 2, 2, 1),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_decode_kernel_matches_reference(case):
    _run_case(*CASES[case])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_decode_xla_matches_reference(case):
    _run_case(*CASES[case], impl="xla")


@T.needs_cpu_kernel
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_decode_cpu_kernel_matches_reference(case):
    _run_case(*CASES[case], impl="cpu")


@T.needs_cpu_kernel
def test_decode_cpu_kernel_odd_shapes_and_bf16_queries():
    """6 tokens per block, group of 4, head_dim 32, ragged lengths; bf16 q -> bf16 out; a
    group of 5 with head_dim 80 (a vector pass of 4 then 1) and head_dim 24 (not a whole
    number of vectors: the scalar loops)."""
    _run_case("int8", 8, 2, 16, 6, [1, 5, 6, 7, 30, 0], 6, None, None, None, impl="cpu")
    _run_case("bf16", 10, 2, 80, 4, [3, 9, 1, 0], 3, None, None, None, impl="cpu")
    _run_case("fp8", 6, 2, 24, 4, [5, 12, 0], 3, None, None, None, impl="cpu")
    _run_case("bf16", 16, 1, 32, 8, [9, 16, 17, 0, 30], 4, None, None, None,
              q_dtype=jnp.bfloat16, impl="cpu")


@T.needs_cpu_kernel
def test_decode_cpu_kernel_mutant_is_caught():
    """Mutation: the same kernel built to skip each row's last position must fail."""
    with pytest.raises(AssertionError):
        _run_case("bf16", 4, 2, 16, 4, [4, 9, 16], 4, None, None, None, impl="cpu",
                  defines=("FINESERVE_MUTATE_DROP_LAST_POSITION",))


@T.needs_cpu_kernel
def test_decode_cpu_kernel_keeps_nan_in_live_kv():
    """A NaN in a position a row reads makes that row NaN, as in the reference (an upstream
    failure must not turn into plausible numbers); other rows stay finite."""
    fmt = KVFormat(num_layers=2, num_kv_heads=1, head_dim=16, kv_dtype="bf16",
                   tokens_per_block=4)
    batch = T.make_paged_batch(fmt, [6, 5], width=2, seed=1)
    view = np.asarray(batch.view).copy()
    block = int(batch.block_tables[0, 1])  # row 0's second block: positions 4..5 live
    view[block, kv_layout.data_offset(fmt, 1, 0, 0, 1)] = 0x7FC07FC0  # K of position 5: NaN
    q = jnp.ones((2, 2, 16), jnp.float32)
    args = (q, jnp.asarray(view), jnp.asarray(batch.block_tables), jnp.asarray(batch.lengths))
    ref = np.asarray(decode_attention(*args, fmt=fmt, layer=1))
    out = np.asarray(decode_attention_cpu(*args, fmt=fmt, layer=1))
    assert np.all(np.isnan(ref[0])) and np.all(np.isnan(out[0]))
    np.testing.assert_allclose(out[1], ref[1], atol=2e-5)


@T.needs_cpu_kernel
def test_decode_cpu_kernel_rows_do_not_depend_on_the_batch():
    """A row's output is the same bits alone and among 40 other rows (SmolLM2's heads)."""
    fmt = KVFormat(num_layers=2, num_kv_heads=3, head_dim=64, kv_dtype="fp8",
                   tokens_per_block=16)
    lengths = list(np.random.default_rng(2).integers(1, 90, 41))
    batch = T.make_paged_batch(fmt, lengths, seed=4)
    q = jnp.asarray(np.random.default_rng(3).standard_normal((41, 9, 64)), jnp.float32)
    tables, lens = jnp.asarray(batch.block_tables), jnp.asarray(batch.lengths)
    run = jax.jit(lambda q, t, n: decode_attention_cpu(q, batch.view, t, n, fmt=fmt, layer=1))
    full = np.asarray(run(q, tables, lens))
    for i in (0, 17, 40):
        alone = np.asarray(run(q[i:i + 1], tables[i:i + 1], lens[i:i + 1]))
        np.testing.assert_array_equal(alone[0].view(np.uint32), full[i].view(np.uint32))


def test_decode_xla_non_pow2_block_steps_and_formats():
    """The XLA path has no power-of-2 constraint: 3 blocks per step, 6 tokens per block."""
    _run_case("int8", 8, 2, 16, 6, [1, 5, 6, 7, 30, 0], 6, None, 3, None, impl="xla")


def test_decode_xla_loop_bound_covers_the_last_block(monkeypatch):
    """Mutation: one loop step fewer than the longest context needs must be caught."""
    _run_case("bf16", 4, 2, 16, 4, [4, 9, 16], 4, None, 1, None, impl="xla")
    honest = xla_attention.num_steps
    monkeypatch.setattr(xla_attention, "num_steps", lambda m, n: honest(m, n) - 1)
    with pytest.raises(AssertionError):
        _run_case("bf16", 4, 2, 16, 4, [4, 9, 16], 4, None, 1, None, impl="xla")


def test_decode_kernel_dot_path_bf16_queries():
    """A 16-row group and 16-word planes take the tl.dot path; bf16 q -> bf16 output."""
    _run_case("bf16", 16, 1, 32, 8, [9, 16, 17, 0, 30], 4, 2, 2, 16, q_dtype=jnp.bfloat16)


def test_decode_random_lengths_batch():
    rng = np.random.default_rng(7)
    lengths = list(rng.integers(0, 40, 6))
    _run_case("int8", 4, 2, 16, 8, lengths, 5, None, 1, 1, seed=3)
    _run_case("int8", 4, 2, 16, 8, lengths, 5, None, 2, None, seed=3, impl="xla")


def test_dispatch(monkeypatch):
    fmt = KVFormat(1, 1, 16, "bf16", 4)
    assert resolve_impl("auto", fmt) == ("pallas_triton" if jax.default_backend() == "gpu"
                                         else "cpu")
    assert resolve_impl("auto", fmt, interpret=True) == "pallas_triton"
    # A format the Triton kernels cannot tile: the CPU kernel on the CPU backend, else xla.
    assert resolve_impl("auto", KVFormat(1, 1, 16, "bf16", 6), interpret=True) == (
        "cpu" if jax.default_backend() == "cpu" else "xla")
    assert resolve_impl("xla", fmt) == "xla" and resolve_impl("reference", fmt) == "reference"
    with pytest.raises(NotImplementedError):
        resolve_impl("mosaic", fmt)
    with pytest.raises(ValueError):
        resolve_impl("cuda", fmt)
    batch = T.make_paged_batch(KVFormat(1, 1, 16, "fp8", 4), [3, 6], width=2)
    q = jnp.ones((2, 2, 16), jnp.float32)
    args = (q, batch.view, jnp.asarray(batch.block_tables), jnp.asarray(batch.lengths))
    ref = decode_attention(*args, fmt=batch.fmt, layer=0)
    for impl in ("pallas_triton", "xla", "cpu"):
        out = decode_attention(*args, fmt=batch.fmt, layer=0, impl=impl)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
    # Turned off (or unbuildable): auto falls back to xla; asking for cpu says why.
    monkeypatch.setenv(cpu_build.ENV_VAR, "0")
    assert resolve_impl("auto", fmt) in ("pallas_triton", "xla")
    with pytest.raises(cpu_build.CpuKernelUnavailable, match="FINESERVE_JAX_CPU_KERNELS=0"):
        resolve_impl("cpu", fmt)
    with pytest.raises(ValueError, match="layer 1 out of range"):
        decode_attention(*args, fmt=batch.fmt, layer=1)
    with pytest.raises(ValueError, match="integer scalar"):
        decode_attention(*args, fmt=batch.fmt, layer=jnp.zeros((2,), jnp.int32))


@T.needs_cpu_kernel
def test_cpu_kernel_build_failure_is_reported_once(tmp_path, monkeypatch):
    """A source that does not compile (here a macro that breaks every file) raises
    CpuKernelUnavailable naming the failing compile and the compiler's message; the failure
    is remembered, so the next call raises at once instead of compiling again."""
    monkeypatch.setenv(cpu_build.DIR_ENV_VAR, str(tmp_path))
    broken = ("int64_t=struct",)
    with pytest.raises(cpu_build.CpuKernelUnavailable,
                       match=r"compiling the CPU kernels failed[\s\S]*\.cc"):
        cpu_build.stacked_matmul_target(broken)
    with pytest.raises(cpu_build.CpuKernelUnavailable, match="compiling the CPU kernels"):
        cpu_build.swiglu_target(broken)
    assert not any(p.suffix == ".so" for p in tmp_path.iterdir())  # nothing half-built left


@pytest.mark.slow
@pytest.mark.parametrize("kv_dtype,group,t,splits", list(itertools.product(
    ["bf16", "fp8", "int8", "int4"], [1, 4, 8], [4, 8], [1, 3])))
def test_decode_full_product(kv_dtype, group, t, splits):
    lengths = [1, t - 1, t, t + 1, 3 * t + 2, 0]
    _run_case(kv_dtype, 2 * group, 2, 16, t, lengths, 4, splits, 2, 1)
    # The XLA path on the same grid (splits -> blocks per step 1 or 3), and the CPU kernel.
    _run_case(kv_dtype, 2 * group, 2, 16, t, lengths, 4, None, splits, None, impl="xla")
    if jax.default_backend() == "cpu":
        _run_case(kv_dtype, 2 * group, 2, 16, t, lengths, 4, None, None, None, impl="cpu")

"""Hadamard-rotated KV rows (int4): the transform against a dense reference, that attention is
unchanged by it, that it lowers int4 error on outlier rows, and that the paged backend stores
rotated rows and the cache-free forward reproduces it."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import hadamard

from fineserve_jax.engine.paged_attention import PagedAttention
from fineserve_jax.engine.step_inputs import empty_inputs
from fineserve_jax.formats import KV_DTYPES, KVFormat
from fineserve_jax.formats import kv_rotation
from fineserve_jax.formats.kv_codec import dequantize_kv_rows, quantize_kv_rows
from fineserve_jax.formats.kv_rotation import hadamard_rows, rotates_kv
from models.attention import CausalAttention, causal_attention
from pallas_kernels.kv_gather import gather_layer_kv


def _dense_rotation(d):
    """Block-diagonal normalized Sylvester Hadamard [d, d] (scipy's), the reference."""
    b = d & -d
    return np.kron(np.eye(d // b), hadamard(b) / np.sqrt(b))


def _roundtrip(x, kv_dtype):
    data, scales = quantize_kv_rows(jnp.asarray(x), kv_dtype)
    return np.asarray(dequantize_kv_rows(data, scales, kv_dtype, x.shape[-1]))


@pytest.mark.parametrize("d", [64, 128, 96, 80, 8])
def test_hadamard_rows_equals_dense_reference_and_is_self_inverse(d, monkeypatch):
    x = np.random.default_rng(d).standard_normal((3, 5, d)).astype(np.float32)
    y = np.asarray(hadamard_rows(jnp.asarray(x)))
    np.testing.assert_allclose(y, x @ _dense_rotation(d), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(hadamard_rows(jnp.asarray(y))), x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # Mutation: blocks of half the size are a different (still orthonormal) transform.
    monkeypatch.setattr(kv_rotation, "hadamard_block", lambda n: (n & -n) // 2)
    assert np.abs(np.asarray(hadamard_rows(jnp.asarray(x))) - x @ _dense_rotation(d)).max() > 0.1


def test_hadamard_rows_keep_dtype_and_rows_do_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    probe = rng.standard_normal((2, 64)).astype(np.float32)
    alone = np.asarray(hadamard_rows(jnp.asarray(probe)))
    others = rng.standard_normal((37, 64)).astype(np.float32) * 1e6
    others[5] = np.nan
    batched = np.asarray(hadamard_rows(jnp.asarray(np.concatenate([others, probe]))))[-2:]
    np.testing.assert_array_equal(alone, batched)
    assert hadamard_rows(jnp.ones((4, 64), jnp.bfloat16)).dtype == jnp.bfloat16


def test_only_int4_rows_are_rotated():
    assert [k for k in KV_DTYPES if rotates_kv(k)] == ["int4"]


def test_rotation_leaves_attention_unchanged():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 9, 6, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 9, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 9, 2, 64)), jnp.float32)
    plain = np.asarray(causal_attention(q, k, v))
    rotated, _ = CausalAttention(rotate_kv=True)(None, 0, q, k, v)
    np.testing.assert_allclose(np.asarray(rotated), plain, rtol=1e-4, atol=1e-5)


def test_rotation_lowers_int4_error_on_rows_with_outlier_channels():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    x[:, [3, 35]] *= 20.0  # a high-norm RoPE pair, as keys have
    plain = np.abs(_roundtrip(x, "int4") - x).mean()
    rot = lambda a: np.asarray(hadamard_rows(jnp.asarray(a)))
    rotated = np.abs(rot(_roundtrip(rot(x), "int4")) - x).mean()
    assert rotated < plain / 2, (plain, rotated)


def _prefill_inputs(n, fmt):
    x = empty_inputs(n, 1, 2)
    x.slot_block = (1 + np.arange(n) // fmt.tokens_per_block).astype(np.int32)
    x.slot_offset = (np.arange(n) % fmt.tokens_per_block).astype(np.int32)
    x.block_tables = np.array([[1, 2]], np.int32)
    x.q_seq = np.zeros(n, np.int32)
    x.q_pos = np.arange(n, dtype=np.int32)
    return x


@pytest.mark.parametrize("kv_dtype", ["int4", "int8"])
def test_paged_backend_stores_rotated_int4_rows_and_matches_the_cache_free_forward(kv_dtype):
    fmt = KVFormat(1, 2, 64, kv_dtype, tokens_per_block=16)
    n = 24
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, n, 6, 64)), jnp.float32)
    k = rng.standard_normal((1, n, 2, 64)).astype(np.float32)
    k[..., [5, 37]] *= 30.0
    v = jnp.asarray(rng.standard_normal((1, n, 2, 64)), jnp.float32)
    view = jnp.zeros((3, fmt.block_words), jnp.uint32)
    backend = PagedAttention(fmt, "prefill", _prefill_inputs(n, fmt), "reference")
    out, view = backend(view, jnp.int32(0), q, jnp.asarray(k), v)
    stored_k, _ = gather_layer_kv(view, fmt, 0, jnp.array([1, 2]))
    stored_k = np.asarray(stored_k).reshape(32, 2, 64)[:n]
    rotate = rotates_kv(kv_dtype)
    expect = _roundtrip(np.asarray(hadamard_rows(jnp.asarray(k[0]))) if rotate else k[0], kv_dtype)
    np.testing.assert_array_equal(stored_k, expect)
    if rotate:  # mutation: the rows a non-rotating backend would store differ
        assert np.abs(stored_k - _roundtrip(k[0], kv_dtype)).max() > 1.0

    def roundtrip(x):
        return jnp.asarray(_roundtrip(np.asarray(x), kv_dtype))

    ref, _ = CausalAttention(roundtrip, rotate_kv=rotate)(None, 0, q, jnp.asarray(k), v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)

"""KV row quantization: error bounds, clipping, packing order, and the in-kernel unpacking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.formats import KV_DTYPES, KVFormat
from fineserve_jax.formats.kv_codec import dequantize_kv_rows, quantize_kv_rows
from pallas_kernels import kv_unpack

D = 32


def _rows(seed, n=64, d=D):
    rng = np.random.default_rng(seed)
    # Rows at very different magnitudes, some shifted (int4 zero point), one outlier row set.
    x = rng.standard_normal((n, d)).astype(np.float32)
    x *= np.exp(rng.uniform(-6, 6, (n, 1))).astype(np.float32)
    x[::5] += rng.uniform(-3, 3, (len(x[::5]), 1)).astype(np.float32)
    x[3, 7] = 1e4
    x[4, 0] = -1e4
    return x


def _roundtrip(x, kv_dtype):
    data, scales = quantize_kv_rows(jnp.asarray(x), kv_dtype)
    return np.asarray(dequantize_kv_rows(data, scales, kv_dtype, x.shape[-1])), data, scales


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_error_bound(kv_dtype):
    x = _rows(0)
    y, data, scales = _roundtrip(x, kv_dtype)
    fmt = KVFormat(1, 1, D, kv_dtype)
    assert data.shape == (64, fmt.data_words) and data.dtype == jnp.uint32
    assert scales.shape == (64, fmt.scale_words) and scales.dtype == jnp.uint32
    assert np.all(np.isfinite(y))
    err = np.abs(y - x)
    amax = np.max(np.abs(x), axis=-1, keepdims=True)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    slack = 4 * np.finfo(np.float32).eps * amax  # f32 rounding of the scale arithmetic
    if kv_dtype == "bf16":
        bound = 2.0 ** -8 * np.abs(x)
    elif kv_dtype == "fp8":
        bound = 2.0 ** -4 * np.abs(x) + 2.0 ** -10 * amax / 448
        assert np.all(err <= 2.0 ** -4 * amax + slack)
    elif kv_dtype == "int8":
        bound = amax / 254
    else:
        bound = (hi - lo) / 30
    assert np.all(err <= bound + slack), float(np.max(err - bound))
    # ... and the bounds are not loose by orders of magnitude (the format really quantizes).
    if kv_dtype != "bf16":
        assert np.max(err / (amax + 1e-30)) > 1e-4


def test_bf16_values_stored_exactly():
    x = np.asarray(jnp.asarray(_rows(1), jnp.bfloat16).astype(jnp.float32))
    y, _, _ = _roundtrip(x, "bf16")
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("kv_dtype", ["fp8", "int8", "int4"])
def test_zero_row_and_constant_row(kv_dtype):
    x = np.zeros((3, D), np.float32)
    x[1] = 2.5  # constant row: int4 scale 0
    x[2, 5] = -3.0
    y, _, scales = _roundtrip(x, kv_dtype)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_allclose(y[1], 2.5, rtol=2 ** -4)
    assert np.all(np.isfinite(np.asarray(jax.lax.bitcast_convert_type(scales, jnp.float32))))


def test_fp8_clips_outliers_instead_of_nan():
    x = np.array([[1e4, -1e4, 1.0, -0.5] * (D // 4)], np.float32)
    y, data, _ = _roundtrip(x, "fp8")
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y[0, :2], [1e4, -1e4], rtol=2 ** -4)
    codes = np.asarray(jax.lax.bitcast_convert_type(data, jnp.uint8)).ravel()
    assert codes[0] == 0x7E and codes[1] == 0xFE  # +-448, the largest finite e4m3fn
    # A value just above amax / scale * 448 after rounding still clips (no NaN code 0x7F).
    assert not np.any((codes & 0x7F) == 0x7F)


def test_int4_nibble_packing_exact():
    # Row 0..15 repeated: scale 1, zero 0, so codes equal values; pack by hand.
    x = np.tile(np.arange(16, dtype=np.float32), D // 16)[None]
    data, scales = quantize_kv_rows(jnp.asarray(x), "int4")
    codes = np.arange(D) % 16
    want = [sum(int(codes[8 * w + k]) << (4 * k) for k in range(8)) for w in range(D // 8)]
    np.testing.assert_array_equal(np.asarray(data)[0], np.array(want, np.uint32))
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(scales, jnp.float32))[0],
                                  [1.0, 0.0])
    y, _, _ = _roundtrip(x, "int4")
    np.testing.assert_array_equal(y, x)


def test_little_endian_element_order():
    x = np.zeros((1, D), np.float32)
    x[0, 0], x[0, 1] = 1.0, -2.0
    data, _ = quantize_kv_rows(jnp.asarray(x), "bf16")
    assert int(data[0, 0]) == (0xC000 << 16) | 0x3F80  # element 0 (1.0) in the low half
    data, _ = quantize_kv_rows(jnp.asarray(x), "int8")
    assert int(data[0, 0]) & 0xFF == 64 and (int(data[0, 0]) >> 8) & 0xFF == 0x81  # 64, -127


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_kernel_unpack_matches_storage_definition(kv_dtype):
    """kv_unpack's shifts and masks decode exactly what dequantize_kv_rows decodes."""
    x = _rows(2)
    data, scales = quantize_kv_rows(jnp.asarray(x), kv_dtype)
    planes = kv_unpack.unpack_subwords(data, kv_dtype)
    f = jax.lax.bitcast_convert_type(scales, jnp.float32)
    if kv_dtype in ("fp8", "int8"):
        planes = [p * f[:, :1] for p in planes]
    elif kv_dtype == "int4":
        planes = [p * f[:, :1] + f[:, 1:2] for p in planes]
    got = kv_unpack.merge_subwords(jnp.stack(planes, axis=-2))
    want = dequantize_kv_rows(data, scales, kv_dtype, D)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    e = 32 // {"bf16": 16, "fp8": 8, "int8": 8, "int4": 4}[kv_dtype]
    np.testing.assert_array_equal(
        np.asarray(kv_unpack.merge_subwords(kv_unpack.split_subwords(jnp.asarray(x), e))), x)

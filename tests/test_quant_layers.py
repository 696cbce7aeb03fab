"""Quantized linear layers against an independent float64 numpy reference.

The reference re-implements the documented arithmetic of `models/quant_linear.py` in numpy:
quantization of weights and (for W8A8/W4A8) activations in float32 numpy (the same IEEE
operations, so the quantized integers/fp8 values must match bit for bit), nibble decoding
from the stored bytes, dequantization and the matmul in float64. The layer must match it
to float32 rounding; mutated layers (swapped nibbles, misplaced scales) must not.
"""

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from fineserve_jax.formats.int4_pack import pack_int4, unpack_int4
from models import quant_linear as ql
from models.linear import Linear

LAYERS = [ql.Fp8Linear, ql.Int8Linear, ql.Int4Linear, ql.W4A8Linear]
FP8 = ml_dtypes.float8_e4m3fn
F32_EPS = np.finfo(np.float32).eps


# --- int4 packing -----------------------------------------------------------------------------

def test_unpack_pack_every_byte():
    every = np.arange(256, dtype=np.uint8)
    nib = np.asarray(unpack_int4(every))
    np.testing.assert_array_equal(nib[0::2], every & 0xF)  # element 2i: low nibble
    np.testing.assert_array_equal(nib[1::2], every >> 4)
    np.testing.assert_array_equal(np.asarray(pack_int4(nib)), every)


def test_pack_unpack_every_pair():
    pairs = np.array(list(itertools.product(range(16), repeat=2)), np.uint8).reshape(-1)
    packed = np.asarray(pack_int4(pairs))
    assert packed.dtype == np.uint8 and packed.shape == (256,)
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), pairs)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 1), st.integers(0, 2**32 - 1))
def test_pack_unpack_roundtrip_any_axis(half, other, axis, seed):
    shape = [2 * half, other] if axis == 0 else [other, 2 * half]
    q = np.random.default_rng(seed).integers(0, 16, shape).astype(np.uint8)
    packed = np.asarray(pack_int4(q, axis))
    assert packed.shape[axis] == half
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, axis)), q)


def test_pack_rejects_odd_length():
    with pytest.raises(ValueError, match="even length"):
        pack_int4(np.zeros((3, 2), np.uint8))


# --- group size ------------------------------------------------------------------------------

@pytest.mark.parametrize("in_features,group,want", [
    (4096, 128, 128), (14336, 128, 128), (64, 128, 64), (200, 128, 100), (96, 128, 96),
    (134, 128, 67), (256, 64, 64),
])
def test_effective_group_size(in_features, group, want):
    assert ql.effective_group_size(in_features, group) == want


# --- the float64 reference ------------------------------------------------------------------

def ref_symmetric(v32, fmt, axis, qmax=None):
    """numpy float32 replica of the symmetric quantizer: (q as float64, scale float32)."""
    qmax = np.float32({"fp8": 448.0, "int8": 127.0}[fmt] if qmax is None else qmax)
    amax = np.max(np.abs(v32), axis=axis, keepdims=True)
    scale = np.maximum(amax * (np.float32(1) / qmax), np.float32(ql.SCALE_FLOOR))
    y = v32 * (np.float32(1) / scale)
    if fmt == "fp8":
        q = np.clip(y, -qmax, qmax).astype(FP8).astype(np.float64)
    else:
        q = np.clip(np.round(y), -qmax, qmax).astype(np.float64)
    return q, scale


def ref_nibbles(packed):
    """Decode [in/2, out] bytes -> [in, out]: row 2i = low nibble of byte row i."""
    out = np.empty((2 * packed.shape[0],) + packed.shape[1:], np.int64)
    out[0::2] = packed & 0xF
    out[1::2] = packed >> 4
    return out


def params(layer):
    return {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(layer, nnx.Param)).items()}


def reference(layer, x):
    """(y_ref float64 [..., out], |.|-sum bound float64 [..., out]) for float32 x."""
    p = params(layer)
    x32 = np.asarray(x, np.float32)
    if "act_scale" in p:
        x32 = x32 * (np.float32(1) / p["act_scale"])
    g = getattr(layer, "group_size", None)
    rep = (lambda a: np.repeat(a.astype(np.float64), g, axis=0))
    if isinstance(layer, ql.Fp8Linear):
        xq, xs = ref_symmetric(x32, "fp8", -1)
        w = p["weight"].astype(np.float64)
        col = xs.astype(np.float64) * p["weight_scale"].astype(np.float64)
        y, bound = (xq @ w) * col, (np.abs(xq) @ np.abs(w)) * np.abs(col)
    elif isinstance(layer, ql.W4A8Linear):
        xq, xs = ref_symmetric(x32, "int8", -1)
        w8 = (ref_nibbles(p["weight"]) - rep(p["weight_zero"])) * rep(p["group_scale"])
        assert np.abs(w8).max() <= 127  # the int8 level never overflows
        col = xs.astype(np.float64) * p["weight_scale"].astype(np.float64)
        y, bound = (xq @ w8) * col, (np.abs(xq) @ np.abs(w8)) * np.abs(col)
    else:
        if isinstance(layer, ql.Int8Linear):
            w = p["weight"].astype(np.float64) * rep(p["weight_scale"])
        else:
            w = (ref_nibbles(p["weight"]) - rep(p["weight_zero"])) * rep(p["weight_scale"])
        xf = x32.astype(np.float64)
        y, bound = xf @ w, np.abs(xf) @ np.abs(w)
    if "bias" in p:
        y = y + p["bias"].astype(np.float64)
        bound = bound + np.abs(p["bias"].astype(np.float64))
    return y, bound


def mismatch(layer, x) -> float:
    """max |y - ref| / (|x| @ |W| bound) in units of float32 eps; ~1-10 when correct."""
    # f32 GEMMs at full precision: GPUs default to TF32 for f32 matmuls (A16 layers).
    with jax.default_matmul_precision("highest"):
        y = np.asarray(layer(jnp.asarray(x)), np.float64)
    ref, bound = reference(layer, x)
    return float(np.max(np.abs(y - ref) / (bound + 1e-30)) / F32_EPS)


TOL_EPS = 64  # float32 rounding of K-term sums and of the scale products


def make(cls, in_f=256, out_f=96, group=128, bias=True, awq=False, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(in_f, out_f)).astype(np.float32) / np.sqrt(in_f)
    b = rng.normal(size=(out_f,)).astype(np.float32) if bias else None
    s = np.exp(rng.normal(size=(in_f,))).astype(np.float32) if awq else None
    return cls(jnp.asarray(w, dtype), None if b is None else jnp.asarray(b, dtype),
               group_size=group, act_scale=s)


def activations(shape, seed=1, outlier_channels=()):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    for c in outlier_channels:
        x[..., c] *= 30.0
    return x


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("awq", [False, True])
def test_layer_matches_float64_reference(cls, awq):
    layer = make(cls, awq=awq)
    x = activations((3, 5, 256), outlier_channels=(7, 100))
    assert mismatch(layer, x) <= TOL_EPS


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("seed", [5, 6, 7])
def test_stored_values_are_the_reference_quantization(cls, seed):
    """The stored integers/fp8 values are RTN of the kernel exactly (numpy float32 replica)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(256, 64)) * 0.05).astype(np.float32)
    p = params(cls(jnp.asarray(w), group_size=64))
    groups = w.reshape(4, 64, 64)
    if cls is ql.Fp8Linear:
        q, s = ref_symmetric(w, "fp8", 0)
        np.testing.assert_array_equal(p["weight"].astype(np.float64), q)
        np.testing.assert_array_equal(p["weight_scale"], s[0])
        return
    if cls is ql.Int8Linear:
        q, s = ref_symmetric(groups, "int8", 1)
        np.testing.assert_array_equal(p["weight"], q.reshape(256, 64))
        np.testing.assert_array_equal(p["weight_scale"], s[:, 0])
        return
    if cls is ql.W4A8Linear:
        w8, s1 = ref_symmetric(w, "int8", 0, qmax=119.0)
        np.testing.assert_array_equal(p["weight_scale"], s1[0])
        groups, integer = w8.astype(np.float32).reshape(4, 64, 64), True
    else:
        integer = False
    lo = np.minimum(groups.min(1, keepdims=True), 0)
    hi = np.maximum(groups.max(1, keepdims=True), 0)
    if integer:  # exact: the span of int8 values is an integer
        scale = np.maximum(np.ceil((hi - lo).astype(np.float64) / 15), 1).astype(np.float32)
    else:
        scale = np.maximum((hi - lo) * (np.float32(1) / np.float32(15)), np.float32(1e-12))
    inv = np.float32(1) / scale
    zero = np.clip(np.round(-lo * inv), 0, 15)
    q = np.clip(np.round(groups * inv) + zero, 0, 15)
    np.testing.assert_array_equal(ref_nibbles(p["weight"]), q.reshape(256, 64))
    np.testing.assert_array_equal(p["weight_zero"], zero[:, 0])
    np.testing.assert_array_equal(p["group_scale" if integer else "weight_scale"], scale[:, 0])


@pytest.mark.parametrize("cls", LAYERS)
def test_small_and_indivisible_inputs_use_a_divisor_group(cls):
    layer = make(cls, in_f=200, out_f=24, group=128)  # 200 = 2 groups of 100
    if hasattr(layer, "group_size"):
        assert layer.group_size == 100
    assert mismatch(layer, activations((4, 200))) <= TOL_EPS


@pytest.mark.parametrize("cls", LAYERS)
def test_from_linear_keeps_call_dtype_and_bias(cls):
    lin = Linear(128, 32, use_bias=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    lin.bias.set_value(jnp.arange(32, dtype=jnp.bfloat16) / 8)
    layer = cls.from_linear(lin, group_size=64)
    assert layer.bias[...].dtype == jnp.bfloat16
    x = jnp.asarray(activations((2, 3, 128)), jnp.bfloat16)
    y = layer(x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 3, 32)
    ref = np.asarray(lin(x), np.float32)
    err = np.linalg.norm(np.asarray(y, np.float32) - ref) / np.linalg.norm(ref)
    assert err < 0.15  # a quantized version of the same layer, not a float32-exact one


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_outliers_stay_finite(cls, dtype):
    """Activations of +-1e4 and Cauchy-tailed weights (|w| up to ~1e5) give finite outputs."""
    rng = np.random.default_rng(3)
    w = (rng.standard_cauchy((256, 64)) * 0.05).astype(np.float32)
    layer = cls(jnp.asarray(w, dtype), group_size=128)
    x = activations((4, 256))
    x[0, :8] = 1e4
    x[1, 3] = -1e4
    x[2] = 0.0  # an all-zero token: scale floor, no 0/0
    y = np.asarray(layer(jnp.asarray(x, dtype)), np.float32)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[2], 0.0)
    if dtype == jnp.float32:
        assert mismatch(layer, x) <= TOL_EPS


def test_qoq_int8_level_never_overflows():
    """|(q - zero) * group_scale| <= 127 for every kind of weight, incl. all-equal groups."""
    rng = np.random.default_rng(4)
    for w in (rng.standard_cauchy((512, 64)), rng.uniform(-1, 1, (512, 64)),
              np.full((512, 64), 0.3), np.abs(rng.normal(size=(512, 64)))):
        layer = ql.W4A8Linear(jnp.asarray(w, jnp.float32), group_size=128)
        p = params(layer)
        rep = lambda a: np.repeat(a.astype(np.int64), 128, axis=0)
        w8 = (ref_nibbles(p["weight"]) - rep(p["weight_zero"])) * rep(p["group_scale"])
        assert np.abs(w8).max() <= 127
        np.testing.assert_array_equal(np.asarray(layer.int8_weight()), w8)


# --- mutations the reference must reject -------------------------------------------------------

def _swapped_nibbles(packed, axis=0):
    q = unpack_int4(packed, axis)
    return jnp.moveaxis(jnp.moveaxis(q, axis, 0).reshape(-1, 2, *q.shape[1:])[:, ::-1]
                        .reshape(q.shape), 0, axis)


MUTATIONS = {
    # int4 nibble order swapped on decode
    "nibble_order": ("unpack_int4", _swapped_nibbles, [ql.Int4Linear, ql.W4A8Linear]),
    # group scales laid out with tile instead of repeat (row r -> group r % G)
    "group_layout": ("expand_groups", lambda a, g: jnp.tile(a, (g, 1)),
                     [ql.Int8Linear, ql.Int4Linear, ql.W4A8Linear]),
    # per-token activation scale taken over the wrong axis (per channel)
    "act_scale_axis": ("symmetric_quantize", None, [ql.Fp8Linear, ql.W4A8Linear]),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutations_are_rejected(name, monkeypatch):
    attr, fn, classes = MUTATIONS[name]
    if fn is None:
        orig = ql.symmetric_quantize
        fn = lambda v, fmt, axis, qmax=None: orig(v, fmt, 0 if axis == -1 else axis, qmax)
    x = activations((128, 128))
    for cls in classes:
        layer = make(cls, in_f=128, out_f=128, group=32)
        assert mismatch(layer, x) <= TOL_EPS
        with monkeypatch.context() as m:
            m.setattr(ql, attr, fn)
            assert mismatch(layer, x) > 1e4, (name, cls.__name__)


def test_layer_class_table():
    assert ql.layer_class("bf16", "bf16") is None
    assert ql.layer_class("int4", "int8") is ql.W4A8Linear
    with pytest.raises(ValueError, match="supported: .*W=fp8/A=fp8"):
        ql.layer_class("int4", "fp8")


def test_layers_jit_and_have_static_metadata():
    layer = make(ql.W4A8Linear, awq=True)
    graphdef, state = nnx.split(layer)
    y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.ones((2, 256)))
    np.testing.assert_allclose(np.asarray(y), np.asarray(layer(jnp.ones((2, 256)))), rtol=1e-6)
    assert (layer.in_features, layer.out_features, layer.group_size) == (256, 96, 128)

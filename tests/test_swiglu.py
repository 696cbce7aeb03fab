"""The CPU SwiGLU kernel (`pallas_kernels/cpu/swiglu.cc`, silu(gate) * up) against float64
truth and JAX's `jax.nn.silu(g) * u`, and the decoder using it.

Cases: odd sizes and several pieces of the thread split, the values where exp overflows or
underflows, NaN and infinities; the comparison is shown able to fail with a kernel built
to take exp(gate) for exp(-gate).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as T
from fineserve_jax import load_model
from models.attention import CausalAttention
from models.layer_kernels import LayerKernels
from pallas_kernels.cpu.activation import swiglu_cpu, swiglu_reference


def _truth(g, u):
    g64 = np.asarray(g, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return (g64 / (1.0 + np.exp(-g64)) * np.asarray(u, np.float64)).astype(np.float32)


def _operands(shape, scale=6.0, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32),
            jnp.asarray(rng.standard_normal(shape), jnp.float32))


def _check(g, u, **kw):
    out = np.asarray(jax.jit(lambda g, u: swiglu_cpu(g, u, **kw))(g, u))
    np.testing.assert_allclose(out, _truth(g, u), rtol=1e-6, atol=1e-37)
    return out


@T.needs_cpu_kernel
@pytest.mark.parametrize("shape", [(1,), (7, 3), (64, 1, 1536), (3 * 16384 + 5,)],
                         ids=["1", "7x3", "64x1x1536", "3pieces+5"])
def test_swiglu_matches_float64_and_jax(shape):
    g, u = _operands(shape)
    out = _check(g, u)
    np.testing.assert_allclose(out, np.asarray(swiglu_reference(g, u)), rtol=2e-6, atol=1e-30)


@T.needs_cpu_kernel
def test_swiglu_special_values():
    g = jnp.asarray([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 86.0,
                     -86.0, 88.5, -88.5, 88.8, -88.8, 100.0, -100.0, 3.4e38, -3.4e38],
                    jnp.float32)
    u = jnp.ones_like(g)
    out = np.asarray(jax.jit(swiglu_cpu)(g, u))
    ref = np.asarray(swiglu_reference(g, u))
    assert np.isnan(out[0]) and np.isnan(out[2]) and np.isnan(ref[2])  # silu(-inf) = NaN
    assert out[1] == np.inf and out[-2] == np.float32(3.4e38)
    # Past ln(FLT_MAX) exp(-g) is inf: -0 exactly (JAX flushes -88.5 already; the kernel
    # keeps the tiny true value there).
    assert out[-1] == 0 and np.signbit(out[-1]) and out[16] == 0 and out[14] == 0
    finite = ~np.isnan(ref)  # atol: float32's exp overflows where float64 still has 1e-37
    np.testing.assert_allclose(out[finite], _truth(g, u)[finite], rtol=1e-6, atol=1e-36)
    np.testing.assert_allclose(out[finite], ref[finite], rtol=1e-6, atol=1e-36)


@T.needs_cpu_kernel
def test_swiglu_kernel_mutant_is_caught():
    g, u = _operands((5, 37))
    _check(g, u)
    with pytest.raises(AssertionError):
        _check(g, u, defines=("FINESERVE_MUTATE_SILU_SIGN",))


@T.needs_cpu_kernel
def test_swiglu_rejects_bad_input_and_passes_other_dtypes_to_jax():
    g, u = _operands((4, 8))
    with pytest.raises(ValueError, match="differ in shape"):
        swiglu_cpu(g, u[:, :5])
    gb, ub = g.astype(jnp.bfloat16), u.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(swiglu_cpu(gb, ub)),
                                  np.asarray(swiglu_reference(gb, ub)))


@T.needs_cpu_kernel
def test_decoder_with_the_swiglu_kernel():
    """The layer scan with the kernel's activation gives the plain decoder's logits."""
    model = load_model("tiny-llama", dtype="float32", seed=3)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 7)))
    positions = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))

    def logits(kernels):
        return np.asarray(jax.jit(lambda t, p: model.module(
            t, p, CausalAttention(), kernels=kernels)[0])(tokens, positions))

    np.testing.assert_allclose(logits(LayerKernels(swiglu=swiglu_cpu)), logits(None),
                               rtol=1e-5, atol=1e-5)

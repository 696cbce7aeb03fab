"""The per-program XLA compile options (models/compile_options.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.engine import step_cache
from models import compile_options as co


@pytest.fixture
def fresh(monkeypatch):
    co._accepted.cache_clear()
    yield monkeypatch
    co._accepted.cache_clear()


def test_cpu_programs_use_the_classic_emitters(fresh):
    fresh.delenv(co.ENV_VAR, raising=False)
    assert co.compiler_options("cpu") == {"xla_cpu_use_fusion_emitters": False,
                                          "xla_backend_optimization_level": 1}
    assert co.compiler_options("gpu") == {}  # no options elsewhere


def test_env_var_restores_xla_defaults(fresh):
    fresh.setenv(co.ENV_VAR, "1")
    assert co.compiler_options("cpu") == {}


def test_an_option_this_jaxlib_does_not_know_is_dropped(fresh):
    fresh.delenv(co.ENV_VAR, raising=False)
    fresh.setitem(co._BY_PLATFORM, "cpu", {"xla_no_such_option_fineserve": True})
    assert co.compiler_options("cpu") == {}


def test_compile_lowered_equals_a_default_compile():
    f = jax.jit(lambda x: jnp.tanh(x) @ x.T + jnp.exp(-x).sum())
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 16)), jnp.float32)
    low = f.lower(x)
    ours, default = step_cache.compile_lowered(low), low.compile()
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(default(x)), rtol=1e-6, atol=1e-6)


def _float_program(x, y):
    """Multiply-adds, transcendentals, a division, reductions and random sampling."""
    z = x * y + x
    return (z, jnp.tanh(x) / (1.0 + y * y), jax.lax.rsqrt(1.0 + y * y) + jnp.log1p(x * x),
            jnp.sum(z, axis=-1), jax.random.normal(jax.random.key(0), x.shape))


def _differing_words(a_tree, b_tree):
    a, b = jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)
    assert a and len(a) == len(b)
    return sum(int((np.asarray(u).view(np.uint8) != np.asarray(v).view(np.uint8)).sum())
               for u, v in zip(a, b))


def test_jit_with_options_gives_the_same_bits_as_xla_defaults(fresh):
    """The project's CPU options (classic emitters, LLVM level 1) change compile time, not
    results: a float program and a stacked quantization (fp8 with GPTQ, int4) give XLA's
    default bits. Mutation: LLVM level 0 (no FMA contraction) must change the float bits."""
    from flax import nnx

    from models.quant_linear import Fp8Linear, Int4Linear

    fresh.delenv(co.ENV_VAR, raising=False)
    rng = np.random.default_rng(1)
    x, y = (jnp.asarray(rng.standard_normal((256, 96)), jnp.float32) for _ in range(2))
    assert _differing_words(co.jit_with_options(_float_program)(x, y),
                            jax.jit(_float_program)(x, y)) == 0

    w = jnp.asarray(rng.standard_normal((2, 64, 48)), jnp.float32)
    a = rng.standard_normal((2, 256, 64)).astype(np.float32)
    h = jnp.asarray(np.einsum("lni,lnj->lij", a, a) / 256)

    def build(k, hess):
        return (nnx.split(Fp8Linear(k, hessian=hess))[1],
                nnx.split(Int4Linear(k, group_size=32))[1])

    assert _differing_words(co.jit_with_options(jax.vmap(build))(w, h),
                            jax.jit(jax.vmap(build))(w, h)) == 0

    fresh.setitem(co._BY_PLATFORM, "cpu", {"xla_backend_optimization_level": 0})
    co._accepted.cache_clear()
    assert _differing_words(co.jit_with_options(_float_program)(x, y),
                            jax.jit(_float_program)(x, y)) > 0


def test_jit_with_options_inside_another_trace_is_a_plain_nested_jit():
    f = co.jit_with_options(lambda x: jnp.sin(x) * 2)
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: f(v) + 1)(x)),
                                  np.asarray(jnp.sin(x) * 2 + 1))
    assert jax.eval_shape(f, x).shape == (4,)

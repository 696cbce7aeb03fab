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


def test_one_shot_programs_skip_llvm_optimizations(fresh):
    fresh.delenv(co.ENV_VAR, raising=False)
    assert co.one_shot_options("cpu") == {"xla_cpu_use_fusion_emitters": False,
                                          "xla_backend_optimization_level": 0}
    assert co.one_shot_options("gpu") == {}
    fresh.setenv(co.ENV_VAR, "1")
    assert co.one_shot_options("cpu") == {}


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


def test_one_shot_jit_gives_the_same_bits_as_an_optimized_compile():
    """Quantizing a stacked kernel (reductions, reciprocals, rounding, GPTQ's Cholesky and
    lazy updates) compiled without LLVM's optimizations equals the optimized program bit for
    bit: one-shot options trade run time only."""
    from flax import nnx

    from models.quant_linear import Fp8Linear, Int4Linear

    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((2, 64, 48)), jnp.float32)
    x = rng.standard_normal((2, 256, 64)).astype(np.float32)
    h = jnp.asarray(np.einsum("lni,lnj->lij", x, x) / 256)

    def build(k, hess):
        return (nnx.split(Fp8Linear(k, hessian=hess))[1],
                nnx.split(Int4Linear(k, group_size=32))[1])

    fast = co.one_shot_jit(jax.vmap(build))(w, h)
    optimized = jax.jit(jax.vmap(build))(w, h)
    leaves = jax.tree.leaves(fast)
    assert leaves and len(leaves) == len(jax.tree.leaves(optimized))
    for a, b in zip(leaves, jax.tree.leaves(optimized)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_one_shot_jit_inside_another_trace_is_a_plain_nested_jit():
    f = co.one_shot_jit(lambda x: jnp.sin(x) * 2)
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: f(v) + 1)(x)),
                                  np.asarray(jnp.sin(x) * 2 + 1))
    assert jax.eval_shape(f, x).shape == (4,)

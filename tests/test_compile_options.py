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
    assert co.compiler_options("cpu") == {"xla_cpu_use_fusion_emitters": False}
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

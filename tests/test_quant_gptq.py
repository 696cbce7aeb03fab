"""GPTQ rounding (models/gptq.py) and its use by the fp8 presets (quant/ptq.py)."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.loader import load_model
from fineserve_jax.quant.ptq import gptq_hessians, quantize_model
from fineserve_jax.quant.projections import projection_layers
from models import gptq as gptq_lib
from models.quant_linear import Fp8Linear, Int4Linear, symmetric_codes, symmetric_scale


def _correlated_inputs(n=512, d=96, seed=0):
    """Inputs whose channels are strongly correlated (where GPTQ has something to gain)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * 0.3 + np.eye(d)
    x = rng.standard_normal((n, d)) @ mix
    x[:, :4] *= 8.0  # a few outlier channels, as in real activations
    return x.astype(np.float32)


def _fp8_round(grid):
    return lambda rows: symmetric_codes(rows, grid, "fp8").astype(jnp.float32) * grid


def _output_error(x, w, q):
    return float(np.mean(np.square(x @ (np.asarray(w) - np.asarray(q)))))


def test_gptq_lowers_the_output_error_and_stays_on_the_grid():
    x = _correlated_inputs()
    w = np.random.default_rng(1).standard_normal((96, 40)).astype(np.float32)
    grid = symmetric_scale(jnp.asarray(w), "fp8", axis=0)
    rnd = _fp8_round(grid)
    rtn = np.asarray(rnd(jnp.asarray(w)))
    q = np.asarray(gptq_lib.gptq_round(jnp.asarray(w), jnp.asarray(x.T @ x), rnd, block=32))
    np.testing.assert_array_equal(np.asarray(rnd(jnp.asarray(q))), q)  # on the grid
    e_rtn, e_gptq = _output_error(x, w, rtn), _output_error(x, w, q)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_gptq_without_error_propagation_is_rtn(monkeypatch):
    """Mutation: an inverse-Hessian factor with its off-diagonal dropped carries no error to
    later rows, so the result is round-to-nearest and the gain above disappears."""
    x = _correlated_inputs()
    w = np.random.default_rng(1).standard_normal((96, 40)).astype(np.float32)
    grid = symmetric_scale(jnp.asarray(w), "fp8", axis=0)
    rnd = _fp8_round(grid)
    real = gptq_lib._upper_inverse_cholesky
    monkeypatch.setattr(gptq_lib, "_upper_inverse_cholesky",
                        lambda h: jnp.diag(jnp.diagonal(real(h))))
    q = np.asarray(gptq_lib.gptq_round(jnp.asarray(w), jnp.asarray(x.T @ x), rnd, block=32))
    np.testing.assert_array_equal(q, np.asarray(rnd(jnp.asarray(w))))


def test_dead_inputs_quantize_to_zero():
    x = _correlated_inputs()
    x[:, 10] = 0.0
    w = np.random.default_rng(2).standard_normal((96, 8)).astype(np.float32)
    grid = symmetric_scale(jnp.asarray(w), "fp8", axis=0)
    q = np.asarray(gptq_lib.gptq_round(jnp.asarray(w), jnp.asarray(x.T @ x), _fp8_round(grid)))
    assert np.all(q[10] == 0) and np.all(np.isfinite(q))


def test_fp8_layer_with_hessian_keeps_rtn_scales_and_lowers_error():
    x = _correlated_inputs()
    w = np.random.default_rng(3).standard_normal((96, 40)).astype(np.float32)
    rtn = Fp8Linear(jnp.asarray(w))
    gq = Fp8Linear(jnp.asarray(w), hessian=jnp.asarray(x.T @ x))
    np.testing.assert_array_equal(np.asarray(gq.weight_scale[...]), np.asarray(rtn.weight_scale[...]))
    assert np.any(np.asarray(gq.weight[...], np.float32) != np.asarray(rtn.weight[...], np.float32))
    y = np.asarray(jnp.asarray(x) @ jnp.asarray(w))
    err = lambda layer: float(np.mean(np.square(np.asarray(layer(jnp.asarray(x))) - y)))
    assert err(gq) < 0.8 * err(rtn)


def test_hessian_errors_name_the_problem():
    w = jnp.ones((64, 8), jnp.float32)
    with pytest.raises(ValueError, match="no GPTQ rounding"):
        Int4Linear(w, group_size=32, hessian=jnp.eye(64))
    with pytest.raises(ValueError, match="hessian must have shape"):
        Fp8Linear(w, hessian=jnp.eye(32))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", dtype="float32")


def test_fp8_preset_uses_gptq_with_a_tokenizer(tiny):
    gq = quantize_model(tiny.module, "fp8", tokenizer=tiny.tokenizer)
    rtn = quantize_model(tiny.module, "fp8", tokenizer=tiny.tokenizer, gptq=False)
    differs = [not np.array_equal(np.asarray(getattr(p, n).weight[...], np.float32),
                                  np.asarray(getattr(q, m).weight[...], np.float32))
               for (_, p, n), (_, q, m) in zip(projection_layers(gq), projection_layers(rtn))]
    assert all(differs)
    # GPTQ lowers each projection's output error on its own calibration inputs.
    from fineserve_jax.quant.awq import collect_projection_inputs
    from fineserve_jax.quant.calibration import calibration_ids

    ids = calibration_ids(None, tiny.tokenizer, tiny.config.vocab_size)
    xs = collect_projection_inputs(tiny.module, ids, max_tokens=512)
    x = xs["layers.0.mlp.down_proj"]
    ref = x @ np.asarray(tiny.module.layers.mlp.down_proj.kernel[...])[0]
    err = lambda m: float(np.mean(np.square(
        np.asarray(m.layer(0).mlp.down_proj(jnp.asarray(x))) - ref)))
    assert err(gq) < err(rtn)


def test_fp8_without_calibration_is_rtn_and_says_so(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="fineserve_jax"):
        m = quantize_model(tiny.module, "fp8")
    assert "rounded to nearest" in caplog.text
    rtn = quantize_model(tiny.module, "fp8", gptq=False)
    for (_, p, n), (_, q, k) in zip(projection_layers(m), projection_layers(rtn)):
        np.testing.assert_array_equal(np.asarray(getattr(p, n).weight[...], np.float32),
                                      np.asarray(getattr(q, k).weight[...], np.float32))


def test_hessians_are_the_input_second_moments(tiny):
    ids = np.arange(64, dtype=np.int32).reshape(2, 32) % tiny.config.vocab_size
    h = gptq_hessians(tiny.module, ids)
    cfg = tiny.config
    assert h["self_attn.q_proj"].shape == (cfg.num_layers, cfg.hidden_size, cfg.hidden_size)
    np.testing.assert_allclose(h["self_attn.q_proj"], h["self_attn.k_proj"])  # same input
    assert np.all(np.linalg.eigvalsh(h["mlp.down_proj"][0].astype(np.float64)) > -1e-4)


def test_hessian_follows_the_awq_input_scale():
    """A layer that divides its inputs by act_scale s sees x / s: GPTQ must weight its rows
    by the second moment of x / s. Quantizing W with act_scale s and X^T X equals quantizing
    W * s with (X / s)^T (X / s) and no scale; dropping the rescaling breaks the equality."""
    x = _correlated_inputs()
    w = np.random.default_rng(4).standard_normal((96, 24)).astype(np.float32)
    s = np.exp(np.random.default_rng(5).uniform(-1.0, 1.0, 96)).astype(np.float32)
    scaled = Fp8Linear(jnp.asarray(w), act_scale=jnp.asarray(s), hessian=jnp.asarray(x.T @ x))
    xs = x / s
    plain = Fp8Linear(jnp.asarray(w * s[:, None]), hessian=jnp.asarray(xs.T @ xs))
    np.testing.assert_allclose(np.asarray(scaled.dequantized_weight()),
                               np.asarray(plain.dequantized_weight()), rtol=0, atol=1e-6)
    unscaled_h = Fp8Linear(jnp.asarray(w * s[:, None]), hessian=jnp.asarray(x.T @ x))
    assert not np.allclose(np.asarray(unscaled_h.dequantized_weight()),
                           np.asarray(plain.dequantized_weight()), atol=1e-6)


def test_default_gptq_falls_back_to_rtn_past_the_memory_limit(tiny, monkeypatch, caplog):
    from fineserve_jax.quant import ptq

    assert ptq.gptq_hessian_bytes(tiny.module) > 0
    monkeypatch.setattr(ptq, "GPTQ_MAX_HESSIAN_BYTES", ptq.gptq_hessian_bytes(tiny.module) - 1)
    with caplog.at_level(logging.INFO, logger="fineserve_jax"):
        m = quantize_model(tiny.module, "fp8", tokenizer=tiny.tokenizer)
    assert "Hessians would take" in caplog.text
    rtn = quantize_model(tiny.module, "fp8", gptq=False)
    same = lambda a, b: all(np.array_equal(np.asarray(getattr(p, n).weight[...], np.float32),
                                           np.asarray(getattr(q, k).weight[...], np.float32))
                            for (_, p, n), (_, q, k) in zip(projection_layers(a),
                                                            projection_layers(b)))
    assert same(m, rtn)
    forced = quantize_model(tiny.module, "fp8", tokenizer=tiny.tokenizer, gptq=True)
    assert not same(forced, rtn)  # an explicit gptq=True ignores the limit

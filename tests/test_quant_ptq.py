"""PTQ: quantize_model, stored bytes, orbax round trips, quantize-on-load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fineserve_jax import checkpoint, load_model
from fineserve_jax.formats import PRESETS, get_preset
from fineserve_jax.quant import param_bytes, projection_layers, quantize_model, quantized_structure
from fineserve_jax.quant import restore_quantized
from fineserve_jax.quant.awq import collect_projection_inputs
from fineserve_jax.quant.calibration import (calibration_ids, heldout_ids, random_token_ids,
                                             read_text)
from fineserve_jax.tokenizer import ByteTokenizer
from fineserve_jax.quant.projections import SITES, layer_path
from models import quant_linear as ql
from models.linear import Linear
from models.presets import REAL, TINY
from models.transformer import Transformer

LAYER_OF = {"org": Linear, "fp8": ql.Fp8Linear, "fp8_kv8": ql.Fp8Linear, "awq": ql.Int4Linear,
            "qoq": ql.W4A8Linear, "int8": ql.Int8Linear, "int8_kv8": ql.Int8Linear}
QUANTIZED = ["fp8", "int8", "awq", "qoq"]  # distinct weight formats (the *_kv8 share them)


def leaves(module):
    return jax.tree.leaves(nnx.state(module, nnx.Param))


def test_every_preset_has_a_layer():
    assert set(LAYER_OF) == set(PRESETS)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_load_every_preset(preset):
    m = load_model("tiny-llama", quant=preset, dtype="bfloat16", seed=0)
    for path, parent, name in projection_layers(m.module):
        assert type(getattr(parent, name)) is LAYER_OF[preset], path
    # param_bytes counts what is stored: packed nibbles, scales, zeros, act_scale
    stored = sum(np.asarray(x).nbytes for x in leaves(m.module))
    assert m.param_bytes == stored == param_bytes(m.module)
    logits = np.asarray(m.logits(np.array([[1, 50, 60, 70]])))
    assert logits.shape == (1, 4, 320) and np.isfinite(logits).all()
    if preset != "org":
        org = load_model("tiny-llama", dtype="bfloat16", seed=0)
        assert param_bytes(m.module, True) < param_bytes(org.module, True)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown precision preset 'int3'; valid presets: "
                                         "org, fp8, fp8_kv8, awq, qoq, int8, int8_kv8"):
        load_model("tiny-llama", quant="int3")
    with pytest.raises(ValueError, match="valid presets"):
        quantize_model(load_model("tiny-llama").module, "w2a2")


def test_quantize_model_copies_and_keeps_the_rest_in_model_dtype():
    org = load_model("tiny-qwen2", dtype="bfloat16", seed=4).module  # biases, tied embeddings
    before = [np.asarray(x) for x in leaves(org)]
    q = quantize_model(org, "int8")
    for (path, parent, name), (_, qparent, _) in zip(projection_layers(org),
                                                     projection_layers(q)):
        assert type(getattr(parent, name)) is Linear  # the input model is untouched
        lin, ql_ = getattr(parent, name), getattr(qparent, name)
        if lin.bias is not None:  # biases stay in the model dtype, unchanged
            assert ql_.bias[...].dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(ql_.bias[...]), np.asarray(lin.bias[...]))
    for a, b in zip(before, leaves(org)):
        np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_array_equal(np.asarray(q.embed_tokens[...]), np.asarray(org.embed_tokens[...]))
    for norm in ("input_layernorm", "post_attention_layernorm"):  # [num_layers, hidden]
        np.testing.assert_array_equal(np.asarray(getattr(q.layers, norm).weight[...]),
                                      np.asarray(getattr(org.layers, norm).weight[...]))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, "fp8")


def test_quantize_model_keeps_lm_head_float():
    org = load_model("tiny-llama", dtype="bfloat16", seed=0).module
    q = quantize_model(org, "fp8")
    assert type(q.lm_head) is Linear and q.lm_head.kernel[...].dtype == jnp.bfloat16
    assert q.embed_tokens[...].dtype == jnp.bfloat16


def test_org_and_kv_only_presets_return_the_module():
    org = load_model("tiny-llama").module
    assert quantize_model(org, "org") is org
    kv_only = get_preset("org").__class__("kv8only", "bf16", "bf16", "fp8")
    assert quantize_model(org, kv_only) is org


def test_act_scales_only_for_awq_presets():
    org = load_model("tiny-llama").module
    with pytest.raises(ValueError, match="awq=False"):
        quantize_model(org, "int8", act_scales={})


# --- stored bytes on realistic widths ----------------------------------------------------------

# Llama-3.1-8B widths, 2 layers (per-layer ratios do not depend on depth), abstract: no memory.
LLAMA8B_2L = REAL["llama-3.1-8b"].replace(num_layers=2)
MAX_LINEAR_RATIO = {"fp8": 0.52, "int8": 0.52, "awq": 0.30, "qoq": 0.30}


@pytest.mark.parametrize("preset", QUANTIZED)
def test_linear_bytes_vs_bf16_on_llama8b_widths(preset):
    org = param_bytes(quantized_structure(LLAMA8B_2L, "org", "bfloat16"), True)
    q = quantized_structure(LLAMA8B_2L, preset, "bfloat16")
    ratio = param_bytes(q, True) / org
    assert ratio <= MAX_LINEAR_RATIO[preset], ratio
    # the bytes are the documented formats: e.g. int4 = nibbles + f32 scale + u8 zero per
    # 128-group (+ f32 act_scale per input channel): 0.5 + 5/128 bytes/weight + O(1/out)
    expected = {"fp8": 0.5, "int8": 0.5 + 2 / 128, "awq": 0.25 + 2.5 / 128, "qoq": 0.25 + 1 / 128}
    assert ratio == pytest.approx(expected[preset], abs=2e-3)


def test_abstract_bytes_equal_concrete_bytes():
    """A hidden-512 model (group 128 divides every width): abstract == concrete, ratios hold."""
    cfg = TINY["tiny-llama"].replace(hidden_size=512, intermediate_size=1024, num_heads=8,
                                     num_kv_heads=4, head_dim=64, num_layers=1)
    org = Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    org_bytes = param_bytes(org, True)
    ones = {layer_path(0, site): np.ones(getattr(p, n).in_features, np.float32)
            for site, p, n in projection_layers(org)}  # bytes do not depend on the values
    for preset in QUANTIZED:
        q = quantize_model(org, preset, act_scales=ones if get_preset(preset).awq else None)
        assert param_bytes(q) == param_bytes(quantized_structure(cfg, preset, "bfloat16"))
        assert param_bytes(q, True) / org_bytes <= MAX_LINEAR_RATIO[preset]


# --- orbax -------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", QUANTIZED)
def test_orbax_roundtrip_bit_identical(preset, tmp_path):
    m = load_model("tiny-qwen2", quant=preset, dtype="bfloat16", seed=7)
    checkpoint.save_params(m.module, str(tmp_path / "q"))
    restored = restore_quantized(m.config, preset, str(tmp_path / "q"), "bfloat16")
    la, lb = leaves(m.module), leaves(restored)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
    ids = jnp.array([[1, 9, 33, 250, 7]])
    np.testing.assert_array_equal(np.asarray(m.module.full_forward(ids)),
                                  np.asarray(restored.full_forward(ids)))


def test_structure_mismatch_is_an_error(tmp_path):
    m = load_model("tiny-llama", quant="int8", seed=0)
    checkpoint.save_params(m.module, str(tmp_path / "q"))
    with pytest.raises(ValueError):  # orbax: "... path ... act_scale not found ..."
        restore_quantized(m.config, "awq", str(tmp_path / "q"))


def test_bf16_hf_checkpoint_quantizes_on_load(tmp_path):
    src = load_model("tiny-llama", dtype="bfloat16", seed=5)
    checkpoint.save_hf_checkpoint(src.module, str(tmp_path))
    org = load_model(str(tmp_path))  # bf16 by default
    fp8 = load_model(str(tmp_path), quant="fp8")
    assert fp8.preset.name == "fp8" and fp8.source == str(tmp_path)
    assert all(isinstance(getattr(p, n), ql.Fp8Linear) for _, p, n in projection_layers(fp8.module))
    ids = np.array([[1, 40, 41, 42, 43, 2]])
    lo, lq = np.asarray(org.logits(ids)), np.asarray(fp8.logits(ids))
    assert np.linalg.norm(lq - lo) / np.linalg.norm(lo) < 0.3
    assert fp8.param_bytes < org.param_bytes


# --- calibration --------------------------------------------------------------------------------

def test_default_calibration_is_the_shipped_text():
    m = load_model("tiny-llama", dtype="float32")
    ids = calibration_ids(None, m.tokenizer, 320)
    text = read_text("calibration")
    assert ids.shape == (16, 256) and ids.dtype == np.int32
    assert m.tokenizer.decode(ids[0]) == text[:255]  # BOS + the text's first 255 bytes
    np.testing.assert_array_equal(calibration_ids(text, m.tokenizer, 320), ids)
    np.testing.assert_array_equal(calibration_ids([1, 2, 3], None, 320), [[1, 2, 3]])
    q1 = quantize_model(m.module, "awq", tokenizer=m.tokenizer)
    q2 = quantize_model(m.module, "awq", calibration=ids)  # text and its ids: the same model
    for x, y in zip(leaves(q1), leaves(q2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    q3 = quantize_model(m.module, "awq", calibration=random_token_ids(320, 8, 64))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(leaves(q1), leaves(q3)))


def test_calibration_errors_name_the_problem():
    org = load_model("tiny-llama").module
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        quantize_model(org, "awq")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        quantize_model(org, "awq", calibration="some text")
    with pytest.raises(ValueError, match="fewer than one row"):
        calibration_ids("short", ByteTokenizer(), 320)
    with pytest.raises(ValueError, match="empty"):
        calibration_ids("  ", ByteTokenizer(), 320)
    with pytest.raises(ValueError, match=r"must lie in \[0, 320\)"):
        calibration_ids([[1, 400]], None, 320)
    with pytest.raises(ValueError, match="int token ids"):
        calibration_ids(np.zeros((2, 3)), None, 320)
    with pytest.raises(ValueError, match="unknown text"):
        read_text("bible")
    held = heldout_ids(ByteTokenizer(), 64)
    assert held.shape[1] == 64 and held.shape[0] > 50


def test_collected_inputs_are_the_layer_inputs():
    org = load_model("tiny-llama", dtype="float32").module
    ids = random_token_ids(320, 2, 8)
    inputs = collect_projection_inputs(org, ids)
    assert type(org.layers.self_attn.q_proj) is Linear  # the model is not modified
    x0 = org.layer(0).input_layernorm(jnp.take(org.embed_tokens[...], ids, axis=0))
    np.testing.assert_allclose(inputs["layers.0.self_attn.q_proj"],
                               np.asarray(x0).reshape(-1, 64), rtol=1e-6)
    assert inputs["layers.1.mlp.down_proj"].shape == (16, 128)
    # Layer 1's inputs are layer 1's (the residual stream after layer 0), not layer 0's again.
    assert set(inputs) == {f"layers.{i}.{s}" for i in range(2) for s in SITES}
    assert not np.allclose(inputs["layers.1.self_attn.q_proj"],
                           inputs["layers.0.self_attn.q_proj"], atol=1e-3)
    with pytest.raises(ValueError, match=r"must lie in \[0, 320\)"):
        collect_projection_inputs(org, np.array([[1, 320]]))
    with pytest.raises(ValueError, match="int token ids"):
        collect_projection_inputs(org, np.zeros((4,), np.int32))

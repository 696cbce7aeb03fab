"""Stacked decoder layers: HF names map to layer indices, every quantized format stacks
(each layer quantized from its own slice, with its own AWQ scale), and a layer taken out of
the stack computes what the scan computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fineserve_jax import checkpoint, load_model
from fineserve_jax.formats import get_preset
from fineserve_jax.quant import quantize_model
from fineserve_jax.quant.projections import SITES, layer_path
from models import quant_linear as ql
from models.attention import CausalAttention
from models.stacking import layer_slice, stack_modules, stacked_depth

FORMATS = ["fp8", "int8", "awq", "qoq"]


def _site(module, site):
    block, name = site.split(".")
    return getattr(getattr(module, block), name)


def _state(module):
    return jax.tree.leaves(nnx.state(module, nnx.Param))


def test_stack_modules_builds_each_layer_from_its_slice():
    ks = jnp.arange(3 * 4 * 2, dtype=jnp.float32).reshape(3, 4, 2)
    stacked = stack_modules(lambda k: ql.Int8Linear(k, group_size=2), (ks,))
    assert stacked_depth(stacked) == 3 and stacked.weight[...].shape == (3, 4, 2)
    for i in range(3):
        alone = ql.Int8Linear(ks[i], group_size=2)
        for a, b in zip(_state(layer_slice(stacked, i)), _state(alone)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stack_modules_shares_one_program_per_key_and_shape():
    """Calls of one key with inputs of one shape reuse the compiled build (no new trace); a
    new shape traces again and gets its own structure; results equal an unshared build."""
    traced = []

    def build(k):
        traced.append(k.shape)
        return ql.Int8Linear(k, group_size=2)

    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((2, 8, 4)), jnp.float32) for _ in range(2))
    c = jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)
    key = ("test-shared", ql.Int8Linear, 2)
    first = stack_modules(build, (a,), key=key)
    second = stack_modules(build, (b,), key=key)
    assert len(traced) == 1  # the second call reused the first's program
    third = stack_modules(build, (c,), key=key)
    assert len(traced) == 2 and third.in_features == 6 and third.weight[...].shape == (2, 6, 4)
    stack_modules(build, (b,))  # no key: its own program, traced again
    assert len(traced) == 3
    for got, x in ((first, a), (second, b), (third, c)):
        want = stack_modules(lambda k: ql.Int8Linear(k, group_size=2), (x,))
        for u, v in zip(_state(got), _state(want)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_hf_names_map_to_layer_indices(tmp_path):
    src = load_model("tiny-qwen2", dtype="float32", seed=1)
    checkpoint.save_hf_checkpoint(src.module, str(tmp_path))
    tensors = checkpoint.SafetensorsDir(str(tmp_path))
    model = checkpoint.build_model(src.config, tensors, "float32")
    for i in range(src.config.num_layers):
        q = np.asarray(model.layer(i).self_attn.q_proj.kernel[...])
        np.testing.assert_array_equal(q, tensors.get(f"model.layers.{i}.self_attn.q_proj.weight").T)
        b = np.asarray(model.layer(i).self_attn.k_proj.bias[...])
        np.testing.assert_array_equal(b, tensors.get(f"model.layers.{i}.self_attn.k_proj.bias"))
    # The layers really differ (a map that wrote one layer everywhere would fail above).
    assert not np.array_equal(np.asarray(model.layer(0).mlp.up_proj.kernel[...]),
                              np.asarray(model.layer(1).mlp.up_proj.kernel[...]))
    exported = dict(checkpoint.model_tensors(model))
    assert set(exported) == set(tensors.keys())
    for name, arr in exported.items():
        np.testing.assert_array_equal(arr, tensors.get(name))


@pytest.mark.parametrize("preset", FORMATS)
def test_every_quantized_format_stacks_layer_by_layer(preset):
    org = load_model("tiny-qwen2", dtype="bfloat16", seed=3).module  # 3 layers, biases
    p = get_preset(preset)
    cls = ql.layer_class(p.weights, p.activations)
    rng = np.random.default_rng(0)
    scales = None
    if p.awq:  # a different scale per layer and site: each must land in its own layer
        scales = {layer_path(i, s): np.exp(rng.normal(size=_site(org.layers, s).in_features))
                  .astype(np.float32) for i in range(3) for s in SITES}
    q = quantize_model(org, preset, act_scales=scales, fold_scales=False)  # stored per projection
    for site in SITES:
        stacked = _site(q.layers, site)
        assert type(stacked) is cls and stacked_depth(stacked) == 3
        for i in range(3):
            lin = _site(org.layer(i), site)
            s = None if scales is None else jnp.asarray(scales[layer_path(i, site)])
            alone = cls.from_linear(lin, group_size=p.group_size, act_scale=s)
            got = _state(layer_slice(stacked, i))
            assert len(got) == len(_state(alone))
            for a, b in zip(got, _state(alone)):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(np.asarray(a).view(np.uint8),
                                              np.asarray(b).view(np.uint8))
    if p.awq:  # mutation: layer 1's scales on layer 0 give other weights
        site = SITES[0]
        wrong = cls.from_linear(_site(org.layer(0), site), group_size=p.group_size,
                                act_scale=jnp.asarray(scales[layer_path(1, site)]))
        assert not np.array_equal(np.asarray(wrong.weight[...]),
                                  np.asarray(layer_slice(_site(q.layers, site), 0).weight[...]))


@pytest.mark.parametrize("preset", ["org", "qoq"])
def test_layer_by_layer_forward_equals_the_scan(preset):
    m = load_model("tiny-llama", quant=preset, dtype="float32", seed=2).module
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 320, (2, 9)), jnp.int32)
    x = m.embed(ids)
    rope = m.rope(jnp.broadcast_to(jnp.arange(9), (2, 9)))
    for i in range(m.config.num_layers):
        x, _ = m.layer(i)(x, rope, jnp.int32(i), CausalAttention(), None)
    np.testing.assert_allclose(np.asarray(m.head(x)), np.asarray(m.full_forward(ids)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="layer 2 out of range"):
        m.layer(2)

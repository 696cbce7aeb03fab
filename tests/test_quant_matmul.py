"""The CPU GEMM by quantized stacked weights read in place (`quant_matmul_cpu`,
`pallas_kernels/cpu/stacked_matmul.cc`) against XLA's dot of the dequantized slice, the
quantized layers using it, and the decoder's scan with it.

Every format (fp8, int8, int4, w4a8) over row, column and K tails, groups smaller and larger
than a K block, and every layer as a traced scalar; w4a8's int32 result must be exact. The
comparisons are shown able to fail: the wrong layer, a kernel that swaps the two nibbles of a
byte, one that drops the last input feature and one that restarts its sums at every K block
must each be rejected.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernel_testing as T
from fineserve_jax import load_model
from models import quant_linear as ql
from models.attention import CausalAttention
from models.layer_kernels import LayerKernels
from models.stacking import in_place_weights, layer_slice, stack_modules, with_stacked_kernels
from pallas_kernels.cpu.matmul import (QUANT_FORMATS, quant_matmul_cpu,
                                       quant_matmul_reference, stacked_matmul_cpu)

# (rows, K, N, groups): register-tile and vector tails, K over several 32/64-row blocks with a
# tail, groups of 2 to 100 rows (smaller and larger than a block), several column groups,
# more rows than one 64-row chunk.
SHAPES = [(1, 8, 3, 1), (7, 34, 17, 17), (13, 200, 100, 2), (64, 576, 192, 9),
          (130, 96, 80, 3), (16, 256, 1000, 2)]


def _operands(fmt, rows, k, n, groups, layers=3, seed=0):
    """x (values the format's activations take, as float32) and the kernel's operands."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    g = (layers, groups, n)
    if fmt == "fp8":
        x = np.asarray(jnp.asarray(x * 8).astype(jnp.float8_e4m3fn).astype(jnp.float32))
        return x, {"weight": jnp.asarray(rng.standard_normal((layers, k, n)) * 40,
                                         jnp.float8_e4m3fn)}
    if fmt == "int8":
        return x, {"weight": jnp.asarray(rng.integers(-127, 128, (layers, k, n)), jnp.int8),
                   "scale": jnp.asarray(rng.random(g) * 0.02, jnp.float32)}
    nibbles = jnp.asarray(rng.integers(0, 256, (layers, k // 2, n)), jnp.uint8)
    zero = jnp.asarray(rng.integers(0, 16, g), jnp.uint8)
    if fmt == "int4":
        return x, {"weight": nibbles, "zero": zero,
                   "scale": jnp.asarray(rng.random(g) * 0.1, jnp.float32)}
    # w4a8: |(q - zero) * group_scale| <= 127 as QoQ guarantees; the extreme activations
    # make sums of a K block reach |64 * 127 * 127| (the kernel's exactness bound)
    x = np.clip(np.round(x * 60), -127, 127).astype(np.float32)
    return x, {"weight": nibbles, "zero": zero,
               "group_scale": jnp.asarray(rng.integers(1, 9, g), jnp.uint8)}


def _run(x, ops, fmt, layer, defines=()):
    kw = {k: v for k, v in ops.items() if k != "weight"}
    fn = jax.jit(lambda x, i: quant_matmul_cpu(x, ops["weight"], i, fmt=fmt, defines=defines, **kw))
    return np.asarray(fn(x, jnp.int32(layer)))


def _reference(x, ops, fmt, layer):
    kw = {k: v for k, v in ops.items() if k != "weight"}
    return np.asarray(quant_matmul_reference(jnp.asarray(x), ops["weight"], layer, fmt=fmt, **kw))


def _check(x, ops, fmt, layer, defines=()):
    out, ref = _run(x, ops, fmt, layer, defines), _reference(x, ops, fmt, layer)
    if fmt == "w4a8":  # integer sums: exact
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, ref)
    else:
        scale = np.abs(ref).max() + 1e-30
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * scale)


@T.needs_cpu_kernel
@pytest.mark.parametrize("fmt", list(QUANT_FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{k}x{n}g{g}" for m, k, n, g in SHAPES])
def test_quant_matmul_matches_the_dequantized_dot(fmt, shape):
    x, ops = _operands(fmt, *shape)
    for layer in range(ops["weight"].shape[0]):
        _check(x, ops, fmt, layer)


@T.needs_cpu_kernel
@pytest.mark.parametrize("fmt", list(QUANT_FORMATS))
def test_quant_matmul_mutants_and_wrong_layer_are_caught(fmt):
    x, ops = _operands(fmt, 20, 150, 96, 3)
    _check(x, ops, fmt, 1)
    with pytest.raises(AssertionError):  # input mutation: the neighbouring layer
        np.testing.assert_allclose(_run(x, ops, fmt, 1), _reference(x, ops, fmt, 2), rtol=1e-3)
    mutants = ["FINESERVE_MUTATE_SKIP_LAST_K", "FINESERVE_MUTATE_RESTART_BLOCKS"]
    if fmt in ("int4", "w4a8"):
        mutants.append("FINESERVE_MUTATE_NIBBLE_ORDER")
    for define in mutants:
        with pytest.raises(AssertionError):
            _check(x, ops, fmt, 1, defines=(define,))


@T.needs_cpu_kernel
@pytest.mark.parametrize("fmt", list(QUANT_FORMATS))
def test_quant_matmul_rows_do_not_depend_on_the_batch(fmt):
    x, ops = _operands(fmt, 37, 576, 200, 4, layers=2, seed=3)
    full = _run(x, ops, fmt, 1)
    for i in (0, 8, 36):
        alone = _run(x[i:i + 1], ops, fmt, 1)
        np.testing.assert_array_equal(alone[0].view(np.uint32), full[i].view(np.uint32))


@T.needs_cpu_kernel
def test_quant_matmul_rejects_bad_input():
    x, ops = _operands("int4", 4, 16, 8, 2)
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        quant_matmul_cpu(x, ops["weight"], 0, fmt="int3")
    with pytest.raises(ValueError, match=r"\[layers, K/2, N\]"):
        quant_matmul_cpu(x[:, :6], ops["weight"], 0, fmt="int4", scale=ops["scale"], zero=ops["zero"])
    with pytest.raises(ValueError, match="zero must be"):
        quant_matmul_cpu(x, ops["weight"], 0, fmt="int4", scale=ops["scale"])
    with pytest.raises(ValueError, match="3 groups do not divide K = 16"):
        quant_matmul_cpu(x, ops["weight"], 0, fmt="int4", scale=ops["scale"][:, :1].repeat(3, 1),
                         zero=ops["zero"][:, :1].repeat(3, 1))
    with pytest.raises(Exception, match="layer out of range"):
        _run(x, ops, "int4", 3)
    with pytest.raises(Exception, match="wrong dtype for its format"):  # int8 bytes as fp8
        jax.block_until_ready(quant_matmul_cpu(x, ops["weight"].astype(jnp.int8).repeat(2, 1), 0,
                                               fmt="fp8"))


# --- the layers and the decoder --------------------------------------------------------------

CLASSES = [ql.Fp8Linear, ql.Int8Linear, ql.Int4Linear, ql.W4A8Linear]


@T.needs_cpu_kernel
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_quantized_layer_in_place_equals_its_slice(cls):
    """Layer i of a stacked quantized projection, multiplied in place, gives its slice's
    output (W4A8 bit for bit: its sums are integers)."""
    rng = np.random.default_rng(1)
    kernels = jnp.asarray(rng.standard_normal((3, 96, 40)) * 0.1, jnp.float32)
    stacked = stack_modules(lambda k: cls(k, group_size=32), (kernels,))
    x = jnp.asarray(rng.standard_normal((5, 96)), jnp.float32)
    graphdef, state = nnx.split(stacked)
    weights = in_place_weights(stacked, None, quant_matmul_cpu)
    assert [w.weight for w in weights] == ["weight"]

    @jax.jit
    def in_place(state, i):
        params = with_stacked_kernels(jax.tree.map(lambda a: a[i], state), state, weights, i)
        return nnx.merge(graphdef, params)(x)

    for i in range(3):
        got, want = np.asarray(in_place(state, jnp.int32(i))), np.asarray(layer_slice(stacked, i)(x))
        if cls is ql.W4A8Linear:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _slice_copies(hlo: str, shapes) -> int:
    """Instructions of optimized HLO that slice one layer's stored [in, out] weights (any
    dtype) out of a stack."""
    dims = "|".join(f"(?:1,)?{i},{o}" for i, o in shapes)
    return len(re.findall(rf"%dynamic[-_]slice\S* = \w+\[(?:{dims})\]", hlo))


@T.needs_cpu_kernel
@pytest.mark.parametrize("preset", ["fp8", "int8", "awq", "qoq"])
def test_quantized_decoder_with_the_in_place_gemm(preset):
    """The scan with quantized layers multiplied in place gives the logits it gives without
    (qoq bit for bit), and its compiled program no longer slices their weights out."""
    module = load_model("tiny-llama", quant=preset, dtype="float32", seed=5).module
    weights = in_place_weights(module.layers, stacked_matmul_cpu, quant_matmul_cpu)
    assert len(weights) == 7 and {w.weight for w in weights} == {"weight"}
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, module.config.vocab_size, (2, 9)))
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))

    def logits(kernels):
        return jax.jit(lambda t, p: module(t, p, CausalAttention(), kernels=kernels)[0])

    plain, in_place = logits(None), logits(LayerKernels(quant_matmul=quant_matmul_cpu))
    got, want = np.asarray(in_place(tokens, positions)), np.asarray(plain(tokens, positions))
    if preset == "qoq":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    state, shapes = nnx.state(module.layers), set()
    for w in weights:
        node = state
        for key in w.path + (w.weight,):
            node = node[key]
        shapes.add(tuple(node[...].shape[1:]))
    copies = {name: _slice_copies(fn.lower(tokens, positions).compile().as_text(), shapes)
              for name, fn in (("plain", plain), ("in_place", in_place))}
    # The counter sees the plain program's copies (so it can fail); the in-place has none.
    assert copies["plain"] >= 4 and copies["in_place"] == 0, copies

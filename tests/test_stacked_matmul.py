"""The CPU GEMM that reads one layer of stacked weights in place (`pallas_kernels/cpu/
stacked_matmul.cc`) against XLA's dot of the slice, and the decoder using it.

The kernel cases cover row and column tails (rows not a multiple of the register tile,
columns not a multiple of the vector), every layer index as a traced scalar, and the
comparison is shown able to fail: the wrong layer, and a kernel built to drop the last
input feature, must be rejected by it. The model cases check the decoder's scan with the
in-place GEMM computes what it computes without, and that the compiled step no longer copies
the dense layers' slices out of the stack (the point of the kernel).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernel_testing as T
from fineserve_jax import load_model
from models.attention import CausalAttention
from models.layer_kernels import LayerKernels
from models.stacking import in_place_weights
from pallas_kernels.cpu.matmul import stacked_matmul_cpu, stacked_matmul_reference

# (rows, in, out): tails of the 8- and 4-row tiles, of the 16/8-wide vectors and the
# 48/24-column panels; more rows than one 64-row chunk; K over several blocks with a tail
# (32-row blocks up to 16 rows, 64 above), more column panels than one group.
SHAPES = [(1, 5, 3), (7, 33, 17), (9, 64, 48), (13, 70, 100), (64, 576, 192), (130, 96, 80),
          (16, 100, 1000), (40, 200, 400)]


def _check(x, w, layer, **kw):
    out = np.asarray(jax.jit(lambda x, w, i: stacked_matmul_cpu(x, w, i, **kw))(x, w, layer))
    ref = np.asarray(stacked_matmul_reference(x, w, layer))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * x.shape[-1] ** 0.5)


def _operands(rows, k, n, layers=3, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((rows, k)), jnp.float32),
            jnp.asarray(rng.standard_normal((layers, k, n)), jnp.float32))


@T.needs_cpu_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_stacked_matmul_matches_the_slice_dot(shape):
    x, w = _operands(*shape)
    for layer in range(w.shape[0]):
        _check(x, w, jnp.int32(layer))


@T.needs_cpu_kernel
def test_stacked_matmul_wrong_layer_and_kernel_mutant_are_caught():
    x, w = _operands(9, 64, 48)
    out = stacked_matmul_cpu(x, w, 1)
    with pytest.raises(AssertionError):  # input mutation: the neighbouring layer
        np.testing.assert_allclose(np.asarray(out), np.asarray(stacked_matmul_reference(x, w, 2)),
                                   rtol=1e-5, atol=1e-4)
    with pytest.raises(AssertionError):  # kernel mutation: the last input feature dropped
        _check(x, w, 1, defines=("FINESERVE_MUTATE_SKIP_LAST_K",))
    x, w = _operands(20, 150, 96)
    _check(x, w, 1)
    with pytest.raises(AssertionError):  # kernel mutation: sums restart at every K block
        _check(x, w, 1, defines=("FINESERVE_MUTATE_RESTART_BLOCKS",))


@T.needs_cpu_kernel
def test_stacked_matmul_rows_do_not_depend_on_the_batch():
    """Each output row is one fixed sum over k: the same bits alone and among 37 rows."""
    x, w = _operands(37, 576, 200, layers=2, seed=3)
    run = jax.jit(lambda x: stacked_matmul_cpu(x, w, 1))
    full = np.asarray(run(x))
    for i in (0, 8, 36):
        alone = np.asarray(run(x[i:i + 1]))
        np.testing.assert_array_equal(alone[0].view(np.uint32), full[i].view(np.uint32))


@T.needs_cpu_kernel
def test_stacked_matmul_rejects_bad_input():
    x, w = _operands(4, 16, 8)
    with pytest.raises(ValueError, match=r"\[\.\.\., K\] and \[layers, K, N\]"):
        stacked_matmul_cpu(x[:, :5], w, 0)
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(jax.jit(stacked_matmul_cpu)(x, w, jnp.int32(3)))
    # bf16 is not the kernel's: it takes the slice dot, same result as the reference
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(stacked_matmul_cpu(xb, wb, 2)),
                                  np.asarray(stacked_matmul_reference(xb, wb, 2)))


def _dense_slice_copies(hlo: str, shapes) -> int:
    """Instructions of optimized HLO that slice one layer's [in, out] (or [1, in, out]) out
    of a stack: XLA names them dynamic-slice..., alone or fused with a bitcast."""
    dims = "|".join(f"(?:1,)?{i},{o}" for i, o in shapes)
    return len(re.findall(rf"%dynamic[-_]slice\S* = f32\[(?:{dims})\]", hlo))


@T.needs_cpu_kernel
def test_decoder_with_the_in_place_gemm():
    """The scan with dense layers multiplied in place gives the same logits as without, and
    its compiled program no longer slices the dense kernels out of the stack."""
    model = load_model("tiny-llama", dtype="float32", seed=5)
    module = model.module
    paths = [w.path + (w.weight,) for w in in_place_weights(module.layers, stacked_matmul_cpu, None)]
    assert len(paths) == 7  # q, k, v, o, gate, up, down
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 9)))
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))

    def logits(matmul):
        return jax.jit(lambda t, p: module(t, p, CausalAttention(), kernels=LayerKernels(matmul))[0])

    plain, in_place = logits(None), logits(stacked_matmul_cpu)
    np.testing.assert_allclose(np.asarray(in_place(tokens, positions)),
                               np.asarray(plain(tokens, positions)), rtol=1e-4, atol=1e-4)
    state, shapes = nnx.state(module.layers), set()
    for path in paths:
        node = state
        for key in path:
            node = node[key]
        shapes.add(tuple(node[...].shape[1:]))
    copies = {name: _dense_slice_copies(fn.lower(tokens, positions).compile().as_text(), shapes)
              for name, fn in (("plain", plain), ("in_place", in_place))}
    # The counter sees the plain program's copies (so it can fail); the in-place has none.
    assert copies["plain"] >= 4 and copies["in_place"] == 0, copies

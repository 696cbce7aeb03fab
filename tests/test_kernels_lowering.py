"""Every GPU kernel lowers for CUDA on a CPU-only machine (Triton IR is emitted at lowering
time; compiling it to PTX needs the GPU and happens in the benchmarks)."""

import functools

import jax
import jax.numpy as jnp
import pytest

from fineserve_jax.formats import KV_DTYPES, KVFormat
from fineserve_jax.kvslab import arena as A
from pallas_kernels import decode_attention, prefill_attention

# (head_dim, tokens/block, q heads, kv heads, q dtype): Llama-3-8B-like (tl.dot path) and a
# tiny test-sized geometry (broadcast-reduce path).
GEOMETRIES = [(128, 16, 32, 8, jnp.bfloat16), (128, 16, 64, 8, jnp.bfloat16),
              (16, 4, 4, 1, jnp.float32)]


def _lower_text(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _assert_triton(text):
    assert "xla.gpu.triton" in text, text[:2000]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["8b", "70b", "tiny"])
def test_kernels_lower_for_cuda(kv_dtype, geometry):
    d, t, hq, hkv, q_dtype = geometry
    fmt = KVFormat(num_layers=4, num_kv_heads=hkv, head_dim=d, kv_dtype=kv_dtype,
                   tokens_per_block=t)
    view = jax.ShapeDtypeStruct((256, fmt.block_words), jnp.uint32)
    tables = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
    q = jax.ShapeDtypeStruct((8, hq, d), q_dtype)
    decode = functools.partial(decode_attention, fmt=fmt, layer=3, impl="pallas_triton",
                               interpret=False)
    _assert_triton(_lower_text(decode, q, view, tables, lengths))

    qp = jax.ShapeDtypeStruct((64, hq, d), q_dtype)
    tok = jax.ShapeDtypeStruct((64,), jnp.int32)
    prefill = functools.partial(prefill_attention, fmt=fmt, layer=3, impl="pallas_triton",
                                interpret=False)
    _assert_triton(_lower_text(prefill, qp, view, tables, tok, tok))


def test_arena_ops_lower_for_cuda():
    fmt = KVFormat(num_layers=2, num_kv_heads=8, head_dim=128, kv_dtype="fp8")
    arena = jax.ShapeDtypeStruct((4, fmt.block_words * 2), jnp.uint32)
    kv = jax.ShapeDtypeStruct((16, 8, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((16,), jnp.int32)
    _lower_text(lambda a, k, v, b, o: A.write_kv(a, fmt, 1, k, v, b, o), arena, kv, kv, ids, ids)
    _lower_text(lambda a, s, d: A.copy_blocks(a, fmt, s, d), arena, ids, ids)
    _lower_text(lambda a, q, b, l: decode_attention(q, A.typed_view(a, fmt), b, l, fmt=fmt,
                                                    layer=1),
                arena, jax.ShapeDtypeStruct((2, 32, 128), jnp.bfloat16),
                jax.ShapeDtypeStruct((2, 4), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))


@pytest.mark.parametrize("kind,size", [("decode", 4), ("prefill", 16)])
def test_engine_step_with_kernels_lowers_for_cuda_with_one_kernel_per_step(kind, size):
    """The whole compiled step (layer scan, traced layer index, KV write, Pallas kernel,
    sampling) lowers for CUDA, and holds one kernel call whatever the depth."""
    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.engine.model_runner import ModelRunner
    from fineserve_jax.loader import load_model

    counts = []
    for depth in ((2, 4) if kind == "decode" else (2, 2)):
        model = load_model("tiny-llama", dtype="bfloat16", num_layers=depth)
        runner = ModelRunner("m", model, model.kv_format(4),
                             Buckets(decode_sizes=(4,), prefill_sizes=(16,), prefill_seqs=2,
                                     table_width=4), "pallas_triton", interpret=False)
        arena = jax.ShapeDtypeStruct((8, 4 * runner.fmt.block_words), jnp.uint32)
        text = runner._jit[kind].trace(runner.params, arena, runner.inputs_for(kind, size)) \
            .lower(lowering_platforms=("cuda",)).as_text()
        _assert_triton(text)
        counts.append(text.count("xla.gpu.triton"))
    assert counts[0] == counts[1] >= 1

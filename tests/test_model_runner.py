"""The compiled step of one model: impl resolved once, the arena in and out as a value and
updated in place through the layer scan, one compiled layer body whatever the depth, and the
parameters shared with the model (no second copy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fineserve_jax.core.buckets import Buckets
from fineserve_jax.engine.model_runner import ModelRunner, _step_fn
from fineserve_jax.kvslab import arena as A
from fineserve_jax.loader import load_model
from models.attention import CausalAttention

BUCKETS = Buckets(decode_sizes=(4,), prefill_sizes=(16,), prefill_seqs=2, table_width=4)


def _runner(name="tiny-llama", quant="org", impl="auto", num_layers=None):
    model = load_model(name, quant=quant, dtype="float32", num_layers=num_layers)
    return ModelRunner("m", model, model.kv_format(4), BUCKETS, impl)


def test_impl_is_resolved_once_by_the_dispatcher():
    r = _runner()
    assert r.requested_impl == "auto"
    assert r.impl == ("pallas_triton" if jax.default_backend() == "gpu" else "cpu")
    assert _runner(impl="reference").impl == "reference"
    with pytest.raises(ValueError, match="unknown attention impl 'fast'"):
        _runner(impl="fast")


def test_parameters_are_the_models_arrays():
    r = _runner()
    ours = jax.tree.leaves(r.params)
    theirs = jax.tree.leaves(nnx.state(r.model.module))
    assert len(ours) == len(theirs) > 0
    assert all(a is b for a, b in zip(ours, theirs))


def _decode_inputs(r, fmt):
    """Row 0 writes its 3rd token (block 9, offset 2), rows 1.. are padding."""
    x = r.inputs_for("decode", 4)
    x.tokens[0], x.positions[0], x.q_pos[0] = 7, 2, 2
    x.slot_block[0], x.slot_offset[0] = 9, 2
    x.lengths[0], x.block_tables[0, 0] = 3, 9
    return x


@pytest.mark.parametrize("quant", ["org", "int8_kv8"])  # bf16 KV; int8 KV with scale words
def test_step_updates_the_arena_in_place_through_the_layer_scan(quant):
    r = _runner(quant=quant)
    fmt = r.fmt
    arena = A.make_arena(128, fmt.block_bytes * 64)  # 8192 blocks (8-16 MiB), far above temps
    arena_bytes = arena.size * 4
    x = _decode_inputs(r, fmt)
    compiled = r._jit["decode"].lower(r.params, arena, x).compile()
    assert "input_output_alias" in compiled.as_text()
    mem = compiled.memory_analysis()
    if mem is not None:  # no arena-sized temporary anywhere in the step
        assert mem.temp_size_in_bytes < arena_bytes // 8, mem
    ptr = arena.unsafe_buffer_pointer()
    new_arena, logits = compiled(r.params, arena, x)
    assert arena.is_deleted() and new_arena.unsafe_buffer_pointer() == ptr
    # Every layer wrote the token's K/V (through the carried view), and nothing else.
    for layer in range(fmt.num_layers):
        k, v = A.read_kv(new_arena, fmt, layer, jnp.array([9, 8]))
        assert np.any(np.asarray(k[0, 2])) and np.any(np.asarray(v[0, 2]))
        assert not np.any(np.asarray(k[1])) and not np.any(np.asarray(k[0, :2]))
    assert logits.shape == (4, r.model.config.vocab_size)  # sampling is a separate program

    # Mutation: a step that still reads the input arena after writing it cannot update in
    # place; the same checks must see the copy.
    def leaky(params, arena, x):
        new, tok = _step_fn(nnx.graphdef(r.model.module), fmt, "decode", r.impl)(params, arena, x)
        return new, tok + arena[0, 0].astype(tok.dtype)

    arena = A.make_arena(128, fmt.block_bytes * 64)
    bad = jax.jit(leaky, donate_argnums=(1,)).lower(r.params, arena, x).compile()
    assert bad.memory_analysis().temp_size_in_bytes >= arena_bytes


def _dot_count(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().as_text().count(" dot(")


def test_one_compiled_layer_body_whatever_the_depth():
    """The optimized HLO of a step holds the layer's matmuls once (inside the scan's while
    loop), for 2 layers as for 5. Mutation: the same layers unrolled in Python multiply them."""
    counts, unrolled = {}, {}
    for depth in (2, 5):
        r = _runner(num_layers=depth)
        arena = jax.ShapeDtypeStruct((9, 4 * r.fmt.block_words), jnp.uint32)
        x = r.inputs_for("decode", 4)
        text = r._jit["decode"].lower(r.params, arena, x).compile().as_text()
        counts[depth] = text.count(" dot(")
        assert " while(" in text

        module = r.model.module
        ids = jnp.ones((2, 3), jnp.int32)

        def python_loop(ids, module=module, depth=depth):
            xs = module.embed(ids)
            rope = module.rope(jnp.broadcast_to(jnp.arange(3), (2, 3)))
            for i in range(depth):
                xs, _ = module.layer(i)(xs, rope, jnp.int32(i), CausalAttention(), None)
            return module.head(xs)

        unrolled[depth] = _dot_count(python_loop, ids)
        np.testing.assert_allclose(np.asarray(python_loop(ids)),
                                   np.asarray(module.full_forward(ids)), rtol=2e-5, atol=2e-5)
    assert counts[2] == counts[5] > 0
    assert unrolled[5] > unrolled[2]


def test_profiles_are_reused_and_single_runs_kept_apart(monkeypatch):
    """Bucket profiling measures only what no earlier start of the same steps measured: a
    second single-run start (`profile_reps=0`, as `LLM`) reuses the first's runs; an engine
    that asks for a real profile (`profile_reps=1`) is never handed those single runs, and
    its own profile then serves everyone. Serving after a start that ran no step still
    compiles nothing. (In-memory store only: no profiles.json is written.)"""
    from fineserve_jax import SamplingParams
    from fineserve_jax.core.request import Request
    from fineserve_jax.engine import step_cache
    from fineserve_jax.engine.device_engine import Engine

    monkeypatch.setattr(step_cache, "_PROFILES", {})
    monkeypatch.setattr(step_cache, "_cache_dir", None)

    def start(reps):
        eng = Engine([("m", "tiny-llama", "org")], tokens_per_block=4, max_model_len=16,
                     buckets=BUCKETS, profile_reps=reps, arena_bytes=1 << 20,
                     compilation_cache_dir=None)
        s = eng.startup
        return eng, s["steps_profiled"], s["steps_profile_reused"]

    n = len(BUCKETS.decode_sizes) + len(BUCKETS.prefill_sizes)
    assert start(0)[1:] == (n, 0)
    eng, measured, reused = start(0)
    assert (measured, reused) == (0, n)  # the first start's single runs
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    outs = eng.run([Request(model="m", prompt=[5, 6, 7], sampling=sp)], realtime=False)
    assert len(outs[0].token_ids) == 3 and eng.steady_state_compiles == 0
    assert start(1)[1:] == (n, 0)  # single runs are no profile
    assert start(1)[1:] == (0, n)
    assert start(0)[1:] == (0, n)  # a real profile serves single-run starts too

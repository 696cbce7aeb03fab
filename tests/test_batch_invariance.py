"""Batch invariance of quantized execution (issue 12 item 3): a request's tokens do not depend
on what else shares its batch.

Why it could: XLA chooses a GEMM algorithm, and with it the float summation order, from the
operand shapes (on XLA CPU, at SmolLM2's widths, a row of x @ W rounds differently when x
has 1, 2..32 or >= 33 rows), and fp8/int8 activation rounding or a quantized KV cache turn
those last-bit differences into different tokens. The quantized layers therefore compute
every row in a GEMM of one fixed shape (`row_blocked_matmul`) or accumulate exactly in int32
(W4A8); scales are per row. The layer tests below run at SmolLM2's widths, where the plain
GEMM is batch-dependent (the mutations prove it), and the engine tests check the whole
path: greedy tokens of a prompt alone == inside a batch of other prompts == the model's own
full forward with the preset's KV round trip, on tiny-llama and (`slow`) on SmolLM2-135M.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.core.buckets import Buckets
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.engine.llm import LLM
from fineserve_jax.formats import PRESETS
from fineserve_jax.formats.kv_codec import quantize_kv_rows
from kernel_testing import greedy_by_full_forward
from models import quant_linear as ql

LAYERS = [ql.Fp8Linear, ql.Int8Linear, ql.Int4Linear, ql.W4A8Linear]
IN, OUT = 576, 192  # SmolLM2's hidden size and k/v width: the GEMM is batch-dependent here
ROW_COUNTS = (1, 2, 5, 17, 33, 100)


def _layer(cls, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(IN, OUT)).astype(np.float32) / np.sqrt(IN)
    return cls(jnp.asarray(w), jnp.asarray(rng.normal(size=OUT).astype(np.float32)))


def _rows_alone_vs_in_batches(layer, seed=1):
    """Max number of differing output bits of 3 probe rows: alone vs placed among other rows
    (random, huge, zero and NaN rows) in calls of every size in ROW_COUNTS."""
    rng = np.random.default_rng(seed)
    probe = (rng.normal(size=(3, IN)) * np.exp(rng.normal(size=(3, 1)))).astype(np.float32)
    call = jax.jit(layer.__call__)
    alone = [np.asarray(call(jnp.asarray(p[None])))[0] for p in probe]
    worst = 0
    for m in ROW_COUNTS:
        if m < 3:
            continue
        others = rng.normal(size=(m, IN)).astype(np.float32) * 1e3 ** rng.random((m, 1))
        others[0] = 0.0
        others[-1] = np.nan
        pos = rng.choice(np.arange(1, m - 1), 2, replace=False) if m > 3 else [1, 2]
        x = others.copy()
        rows = [0, *pos]
        x[rows] = probe
        y = np.asarray(call(jnp.asarray(x)))
        for r, a in zip(rows, alone):
            worst = max(worst, int((y[r].view(np.uint32) != a.view(np.uint32)).sum()))
    return worst


@pytest.mark.parametrize("cls", LAYERS)
def test_layer_rows_do_not_depend_on_the_batch(cls):
    assert _rows_alone_vs_in_batches(_layer(cls)) == 0


@pytest.mark.parametrize("cls", [ql.Fp8Linear, ql.Int8Linear, ql.Int4Linear])
def test_mutation_one_plain_gemm_is_batch_dependent(cls, monkeypatch):
    """Without row blocks (one GEMM over all rows) the same check fails at these widths."""
    monkeypatch.setattr(ql, "row_blocked_matmul",
                        lambda x, w, acc, block=None: ql._matmul(x, w, acc))
    assert _rows_alone_vs_in_batches(_layer(cls)) > 0


def test_mutation_w4a8_needs_its_exact_int32_accumulation(monkeypatch):
    """W4A8 is batch-invariant because its int32 sums are exact; the same quantized values
    scaled to float first and multiplied in one float GEMM are batch-dependent. (Plain
    float32 sums of the int8 products would still be exact here: |sum| < 576 * 127^2 < 2^24.)"""
    def float_gemm(self, x, compute_dtype):
        xq, x_scale = ql.symmetric_quantize(x, "int8", axis=-1)
        return ql._matmul(xq.astype(jnp.float32) * x_scale, self.dequantized_weight(),
                          jnp.float32)

    layer = _layer(ql.W4A8Linear)
    assert _rows_alone_vs_in_batches(layer) == 0
    monkeypatch.setattr(ql.W4A8Linear, "_product", float_gemm)
    assert _rows_alone_vs_in_batches(layer) > 0


def test_row_blocked_matmul_values_and_shapes():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(IN, 40)).astype(np.float32)
    for shape in [(0, IN), (1, IN), (3, 7, IN), (37, IN)]:
        x = rng.normal(size=shape).astype(np.float32)
        y = np.asarray(ql.row_blocked_matmul(jnp.asarray(x), jnp.asarray(w), jnp.float32, 16))
        assert y.shape == shape[:-1] + (40,)
        np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="block must be >= 1"):
        ql.row_blocked_matmul(jnp.zeros((2, IN)), jnp.asarray(w), jnp.float32, 0)


def _kv_rows_independent(quantize, kv_dtype):
    """Whether each token's stored KV words are the same alone as inside a batch of 6."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(6, 2, 64)).astype(np.float32) * np.exp(rng.normal(size=(6, 2, 1)))
    batch = [np.asarray(a) for a in quantize(jnp.asarray(rows), kv_dtype)]
    for i in range(rows.shape[0]):
        alone = [np.asarray(a) for a in quantize(jnp.asarray(rows[i:i + 1]), kv_dtype)]
        if not all(np.array_equal(a[0], b[i]) for a, b in zip(alone, batch)):
            return False
    return True


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8", "int8", "int4"])
def test_kv_rows_quantize_independently(kv_dtype):
    """A KV row's stored words depend on that row only (one scale per row of head_dim)."""
    assert _kv_rows_independent(quantize_kv_rows, kv_dtype)
    # Mutation: values normalised by the batch's largest magnitude (a shared scale).
    shared = lambda x, d: quantize_kv_rows(x * (1.0 / jnp.max(jnp.abs(x))), d)
    assert not _kv_rows_independent(shared, kv_dtype)


# --- the engine, every preset, tiny models ----------------------------------------------------

PROMPTS = [[1, 5, 9], list(range(3, 3 + 15)), list(range(10, 10 + 33)), [1] + [7] * 8]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SMALL = Buckets(decode_sizes=(1, 4), prefill_sizes=(16, 64), prefill_seqs=4)
# The default suite runs one preset per weight-layer and KV format that rounds activations or
# KV (fp8 W8A8 + fp8 KV, int8 W8A16 + int8 KV, W4A8 + int4 KV); the others are `slow`.
DEFAULT_PRESETS = ("fp8_kv8", "int8_kv8", "qoq")


def check_alone_batched_full(llm, prompts, sampling, label):
    batched = llm.generate(prompts, sampling)
    for p, b in zip(prompts, batched):
        alone = llm.generate([p], sampling)[0]
        assert alone.status == b.status == "finished"
        assert alone.token_ids == b.token_ids, (label, p)
        assert b.token_ids == greedy_by_full_forward(llm.model, p, sampling.max_tokens, width=64), (label, p)


@pytest.mark.parametrize("preset", [
    p if p in DEFAULT_PRESETS else pytest.param(p, marks=pytest.mark.slow) for p in PRESETS])
def test_greedy_alone_equals_batched_equals_full_forward(preset):
    llm = LLM(model="tiny-llama", quant=preset, dtype="float32", max_model_len=64,
              tokens_per_block=4, buckets=SMALL, profile_reps=0, enable_prefix_caching=False)
    check_alone_batched_full(llm, PROMPTS, GREEDY, preset)


# --- the engine, every preset, the real model (SmolLM2-135M) ----------------------------------

REAL_PROMPTS = ["Once upon a time", "The capital of France is",
                "Water boils at a temperature of", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf", reason="GGUF import needs the gguf package (pip install .[gguf])")
    from fineserve_jax.real_models import RealModelUnavailable, smollm2_gguf
    try:
        return smollm2_gguf()
    except RealModelUnavailable as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


REAL_GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _real_llm(path, preset, buckets):
    return LLM(model=path, quant=preset, dtype="float32", max_model_len=64, buckets=buckets,
               profile_reps=0, enable_prefix_caching=False)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_real_model_greedy_alone_equals_batched(smollm2, preset):
    """SmolLM2, float32, 16 greedy tokens of 4 text prompts, alone vs in one batch (decode
    batch 1 vs 4, prefill bucket 16 vs 64; AWQ presets calibrate on the shipped text).
    Before the XLA attention kept its query tile fixed whatever the bucket, fp8 gave other
    tokens for 2 of 4 prompts here (tests/test_kernels_prefill.py has the mutation)."""
    llm = _real_llm(smollm2, preset, SMALL)
    prompts = [llm.model.tokenizer.encode(p) for p in REAL_PROMPTS]
    batched = llm.generate(prompts, REAL_GREEDY)
    for p, b in zip(prompts, batched):
        assert llm.generate([p], REAL_GREEDY)[0].token_ids == b.token_ids, (preset, p)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "the engine's attention is not the dense attention of Model.logits: the engine attends in "
    "tiles (online softmax over 64-token steps; prefill query tiles of 32 rows, decode 1 row) "
    "and XLA sums each tile shape in its own order, while the full forward takes one softmax "
    "over all positions; fp8 activation rounding turns the last-bit differences into other "
    "tokens at logit gaps of 0.02-0.1 (3 of 4 prompts on SmolLM2 measured 2026-12-02, before "
    "the fixed query tile; still unequal after it). "
    "Alone == batched holds (test above)."))
def test_real_model_fp8_equals_full_forward(smollm2):
    llm = _real_llm(smollm2, "fp8", SMALL)
    prompts = [llm.model.tokenizer.encode(p) for p in REAL_PROMPTS]
    batched = llm.generate(prompts, REAL_GREEDY)
    for p, b in zip(prompts, batched):
        assert b.token_ids == greedy_by_full_forward(llm.model, p, REAL_GREEDY.max_tokens,
                                                     width=64), p

"""On-device sampling: greedy, temperature, top-k, top-p, per-row seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.engine.sampling import greedy_tokens, sample_tokens

# Compiled once per shape, as inside the engine's step (eager calls would trace its
# lax.cond anew on every call).
_sample_tokens = jax.jit(sample_tokens)


def _call(logits, temperature, top_k=0, top_p=1.0, seeds=None, steps=None):
    r = logits.shape[0]
    return np.asarray(_sample_tokens(
        jnp.asarray(logits, jnp.float32), jnp.full(r, temperature, jnp.float32),
        jnp.full(r, top_k, jnp.int32), jnp.full(r, top_p, jnp.float32),
        jnp.asarray(seeds if seeds is not None else np.arange(r), jnp.uint32),
        jnp.asarray(steps if steps is not None else np.zeros(r), jnp.int32)))


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(5, 50))
    np.testing.assert_array_equal(_call(logits, 0.0), logits.argmax(-1))


def _greedy_cases():
    """Rows that separate argmax's exact semantics: ties (first index wins), NaN (first NaN
    wins), all -inf, +inf, a maximum in the last column, and a wide random block."""
    nan, inf = np.nan, np.inf
    rows = [[1.0, 3.0, 3.0, 2.0, 0.0], [0.0, nan, 5.0, nan, 1.0], [-inf] * 5,
            [1.0, inf, 2.0, inf, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0], [7.0, 7.0, 7.0, 7.0, 7.0],
            [-1e30, -3e38, -1e30, 0.0, -0.0]]
    wide = np.random.default_rng(3).normal(size=(9, 49152)).astype(np.float32)
    wide[4, [5, 40000]] = 9.0  # a tie far apart (in different chunks of the vocabulary)
    # the same cases across chunks: a NaN after the maximum, +inf and NaN, all -inf, a
    # maximum in the last column
    wide[5, [2, 49150]] = 99.0, nan
    wide[6, [1, 30000, 49151]] = inf, nan, inf
    wide[7] = -inf
    wide[8, 49151] = 50.0
    return np.asarray(rows, np.float32), wide


def test_greedy_tokens_matches_argmax_exactly():
    small, wide = _greedy_cases()
    fn = jax.jit(greedy_tokens)
    for logits in (small, wide):
        np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(logits))),
                                      np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
    np.testing.assert_array_equal(_call(small, 0.0), np.asarray(jnp.argmax(small, axis=-1)))


def test_greedy_tokens_mutations_are_caught():
    """The test cases above must reject the plausible wrong versions: the last tie instead
    of the first, and NaN rows ignored."""
    small, _ = _greedy_cases()
    want = np.asarray(jnp.argmax(jnp.asarray(small), axis=-1))
    v = small.shape[-1]

    def last_tie(x):
        top = jnp.max(x, axis=-1, keepdims=True)
        return jnp.max(jnp.where((x == top) | jnp.isnan(x), jnp.arange(v), -1), axis=-1)

    def nan_blind(x):
        top = jnp.max(x, axis=-1, keepdims=True)
        return jnp.min(jnp.where(x == top, jnp.arange(v), v), axis=-1)

    for wrong in (last_tie, nan_blind):
        assert (np.asarray(jax.jit(wrong)(jnp.asarray(small))) != want).any(), wrong.__name__


@pytest.mark.parametrize("mutant", ["last_chunk", "nan_blind_chunks"])
def test_greedy_tokens_chunk_mutations_are_caught(mutant):
    """The wide cases reject a two-stage argmax that takes the last chunk holding the
    maximum, or that does not look for NaN across chunks."""
    _, wide = _greedy_cases()
    want = np.asarray(jnp.argmax(jnp.asarray(wide), axis=-1))

    def wrong(logits):
        r, v = logits.shape
        x = logits.reshape(r, v // 1024, 1024)
        chunk_max = jnp.max(x, axis=-1)
        top = jnp.max(chunk_max, axis=-1, keepdims=True)
        hold = chunk_max == top
        if mutant == "last_chunk":
            hold = hold | jnp.isnan(chunk_max)
            j = hold.shape[-1] - 1 - jnp.argmax(hold[:, ::-1], axis=-1)
        else:
            j = jnp.argmax(hold, axis=-1)
        chunk = jnp.take_along_axis(x, j[:, None, None], axis=1)[:, 0]
        return j * 1024 + jnp.argmax((chunk == top) | jnp.isnan(chunk), axis=-1)

    assert (np.asarray(jax.jit(wrong)(jnp.asarray(wide))) != want).any()


def test_greedy_tokens_takes_the_nan_path_exactly_when_a_chunk_sum_is_nan(monkeypatch):
    """Clean batches take the one-pass path (XLA's CPU max reduction drops NaNs, so that
    path alone is wrong on NaN rows); a batch where a chunk holds a NaN, or +inf and -inf,
    takes `_greedy_with_nans`. Replacing that path with garbage must change exactly the
    batches the guard sends there."""
    from fineserve_jax.engine import sampling

    small, wide = _greedy_cases()
    clean = np.random.default_rng(3).normal(size=(5, 49152)).astype(np.float32)
    clean[1, 7] = clean[1, 9000] = np.inf  # +inf twice: first index wins, no NaN sum
    mixed_inf = clean.copy()
    mixed_inf[2, [10, 20]] = np.inf, -np.inf  # one chunk sums to NaN: the careful path
    for logits in (clean, mixed_inf, small, wide):
        got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(logits)))
        np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
    monkeypatch.setattr(sampling, "_greedy_with_nans",
                        lambda x: jnp.full(x.shape[:1], -1, jnp.int32))
    def patched(logits):  # a new function: no trace cached from before the patch
        return np.asarray(jax.jit(lambda x: sampling.greedy_tokens(x))(jnp.asarray(logits)))

    assert (patched(clean) >= 0).all()
    for logits in (mixed_inf, wide):
        assert (patched(logits) == -1).all()


def test_top_k_one_is_greedy_and_top_k_restricts_support():
    logits = np.random.default_rng(1).normal(size=(4, 30))
    np.testing.assert_array_equal(_call(logits, 1.0, top_k=1), logits.argmax(-1))
    top3 = np.argsort(-logits, axis=-1)[:, :3]
    for step in range(20):
        got = _call(logits, 2.0, top_k=3, steps=np.full(4, step))
        assert all(g in t for g, t in zip(got, top3))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # Row probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps the first two tokens only.
    logits = np.log(np.array([[0.5, 0.3, 0.2]] * 3))
    seen = {int(t) for step in range(60) for t in _call(logits, 1.0, top_p=0.6, steps=np.full(3, step))}
    assert seen == {0, 1}


def test_rows_are_independent_of_the_batch():
    logits = np.random.default_rng(2).normal(size=(6, 40))
    full = _call(logits, 1.0, seeds=np.arange(6) + 7, steps=np.arange(6))
    alone = _call(logits[2:3], 1.0, seeds=[9], steps=[2])
    assert full[2] == alone[0]


def test_extreme_accepted_sampling_params_fit_the_device_arrays():
    """The largest and smallest values `SamplingParams` accepts go into the step's arrays
    (int32 top_k, uint32 seed, float32 temperature/top_p) and sample valid tokens; one step past
    each bound is refused before it could overflow an array. (The top_p floor is the smallest
    normal float32: XLA flushes subnormals to 0, and top_p 0 keeps no token, giving token 0.)"""
    import pytest

    from fineserve_jax.core.field_checks import (
        FLOAT32_MAX,
        FLOAT32_TINY,
        INT32_MAX,
        UINT32_MAX,
        InvalidRequest,
    )
    from fineserve_jax.core.sampling_params import SamplingParams

    logits = np.random.default_rng(3).normal(size=(3, 40))
    rows = [SamplingParams(temperature=FLOAT32_MAX, top_k=INT32_MAX, seed=UINT32_MAX),
            SamplingParams(temperature=1e-30, top_p=FLOAT32_TINY, seed=0),
            SamplingParams(temperature=2.0, top_k=1, top_p=1.0, seed=7)]
    got = _call_rows(logits, rows)
    assert ((0 <= got) & (got < logits.shape[1])).all()
    assert got[1] == logits[1].argmax() and got[2] == logits[2].argmax()
    for kw in (dict(top_k=INT32_MAX + 1), dict(seed=UINT32_MAX + 1), dict(temperature=FLOAT32_MAX * 2),
               dict(top_p=FLOAT32_TINY / 2)):
        with pytest.raises(InvalidRequest):
            SamplingParams(**kw)


def _call_rows(logits, rows):
    return np.asarray(sample_tokens(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(np.array([p.temperature for p in rows], np.float32)),
        jnp.asarray(np.array([p.top_k for p in rows], np.int32)),
        jnp.asarray(np.array([p.top_p for p in rows], np.float32)),
        jnp.asarray(np.array([p.seed for p in rows], np.uint32)),
        jnp.zeros(len(rows), jnp.int32)))

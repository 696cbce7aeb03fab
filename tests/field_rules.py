"""Reference rules for request fields, written independently of
`fineserve_jax.core.field_checks`, and the hypothesis strategies and oracle check that the
`SamplingParams` and `Request` property tests share."""

import math
from fractions import Fraction

import numpy as np
from hypothesis import strategies as st

from fineserve_jax.core.field_checks import FLOAT32_MAX, INT32_MAX, InvalidRequest

NAN_INF = [math.nan, math.inf, -math.inf, np.float32("nan")]

# Values of every kind a user, a JSON file or numpy code can hand over.
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2**80, 2**80), st.floats(),
    st.floats(width=32).map(np.float32), st.integers(-2**63, 2**63 - 1).map(np.int64),
    st.integers(0, 2**64 - 1).map(np.uint64), st.just(np.bool_(True)), st.just(10**5000),
    st.text(max_size=4), st.binary(max_size=3), st.lists(st.integers(-5, 2**32), max_size=3),
    st.lists(st.floats(), max_size=2).map(tuple), st.lists(st.text(max_size=1), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.fractions(),
    st.just(object()), st.just(np.arange(3)), st.just(np.array([1, 2], np.int16)),
    st.just(np.array([1.0])), st.just(np.zeros((2, 2), np.int32)),
)


def is_int(v):
    return (type(v) is int or isinstance(v, np.integer)) and not isinstance(v, (bool, np.bool_))


def int_in(v, lo, hi):
    return is_int(v) and lo <= int(v) <= hi


def number_in(v, lo, hi=FLOAT32_MAX, lo_open=False):
    """A finite real (ints too, never bools) in [lo, hi] ((lo, hi] with lo_open)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating, Fraction)):
        return False
    try:
        f = float(v)
    except OverflowError:
        return False
    return math.isfinite(f) and (f > lo if lo_open else f >= lo) and f <= hi


def utf8(v):
    try:
        v.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def token_ids_ok(v):
    if isinstance(v, np.ndarray):
        return (v.ndim == 1 and np.issubdtype(v.dtype, np.integer)
                and all(0 <= t <= INT32_MAX for t in v.tolist()))
    return isinstance(v, (list, tuple)) and all(int_in(t, 0, INT32_MAX) for t in v)


def field_values(valid, plausible, base):
    """Keyword dicts: one field varied over `base` (so one wrongly accepted value cannot hide
    behind another bad field), or every field at once."""
    def value(k):
        return plausible[k] | ANY
    one = st.sampled_from(sorted(valid)).flatmap(lambda k: value(k).map(lambda v: {**base, k: v}))
    many = st.fixed_dictionaries({k: value(k) for k in base},
                                 optional={k: value(k) for k in valid if k not in base})
    return one | many


def build_as_the_rules_say(cls, kw, valid):
    """`cls(**kw)` succeeds exactly when every field obeys `valid`; a refusal is an
    InvalidRequest naming a field that breaks its rule. -> the object, or None if refused."""
    ok = all(valid[k](v) for k, v in kw.items())
    try:
        obj = cls(**kw)
    except InvalidRequest as e:
        assert not ok, f"refused a valid {kw!r}: {e}"
        assert e.field in kw and not valid[e.field](kw[e.field])
        assert str(e).startswith(e.field)
        return None
    assert ok, f"accepted {kw!r}"
    return obj

"""`SamplingParams` checks types and ranges when built: every value it accepts fits the device
arrays it goes into, everything else raises `InvalidRequest` naming the field and the value."""

import dataclasses

import numpy as np
import pytest
from field_rules import (
    NAN_INF,
    build_as_the_rules_say,
    field_values,
    int_in,
    number_in,
    token_ids_ok,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fineserve_jax.core.field_checks import (
    FLOAT32_MAX,
    INT32_MAX,
    UINT32_MAX,
    InvalidRequest,
)
from fineserve_jax.core.sampling_params import SamplingParams

# The reference rules (tests/field_rules.py is independent of fineserve_jax.core.field_checks).
VALID = {
    "max_tokens": lambda v: int_in(v, 1, INT32_MAX),
    "temperature": lambda v: number_in(v, 0.0),
    # XLA on CPU flushes float32 subnormals to 0: the smallest normal float32 is the floor.
    "top_p": lambda v: (number_in(v, 0.0, 1.0, lo_open=True)
                        and np.float32(float(v)) >= np.finfo(np.float32).tiny),
    "top_k": lambda v: int_in(v, 0, INT32_MAX),
    "seed": lambda v: v is None or int_in(v, 0, UINT32_MAX),
    "stop_token_ids": token_ids_ok,
    "ignore_eos": lambda v: isinstance(v, (bool, np.bool_)),
}


def edges(lo, hi):
    """The values on and just past the bounds of an integer range."""
    return st.sampled_from([lo - 1, lo, hi, hi + 1, np.int64(hi), np.int64(hi) + 1, True, False, float(lo)])


PLAUSIBLE = {
    "max_tokens": edges(1, INT32_MAX) | st.integers(-2, 2**31 + 1),
    "temperature": st.sampled_from([*NAN_INF, -0.0, 0, FLOAT32_MAX, 3.5e38, 1e-300, -1e-300])
    | st.floats(-1, 3.5e38) | st.integers(-1, 10),
    "top_p": st.sampled_from([*NAN_INF, 1e-46, 1.5e-45, 1.1e-38, 1.2e-38, 1, 0, 1.0000001,
                              np.float32(1e-45)]) | st.floats(-0.1, 1.1),
    "top_k": edges(0, INT32_MAX) | st.integers(-1, 2**31),
    "seed": st.none() | edges(0, UINT32_MAX) | st.integers(-1, 2**32),
    "stop_token_ids": st.lists(edges(0, INT32_MAX) | st.integers(-1, 2**31), max_size=3),
    "ignore_eos": st.booleans() | st.sampled_from([0, 1, np.bool_(False), None]),
}


@settings(max_examples=500, deadline=None)
@given(field_values(VALID, PLAUSIBLE, base={}))
def test_construction_succeeds_exactly_when_every_field_is_valid(kw):
    p = build_as_the_rules_say(SamplingParams, kw, VALID)
    if p is None:
        return
    assert p.problem() is None
    # Normalized to plain Python types that fit the device arrays.
    assert type(p.max_tokens) is int and type(p.top_k) is int and type(p.ignore_eos) is bool
    assert type(p.temperature) is float and type(p.top_p) is float
    assert p.seed is None or type(p.seed) is int
    assert isinstance(p.stop_token_ids, tuple) and all(type(t) is int for t in p.stop_token_ids)
    np.array([p.max_tokens, p.top_k, *p.stop_token_ids], np.int32)
    assert np.isfinite(np.array([p.temperature, p.top_p], np.float32)).all()
    np.array([p.seed or 0], np.uint32)


EDGE_VALUES = {
    "max_tokens": [0, 1, INT32_MAX, INT32_MAX + 1, True, 1.0, np.int32(1)],
    "temperature": [-1e-300, -0.0, 0, FLOAT32_MAX, FLOAT32_MAX * 1.0000001, *NAN_INF, True],
    "top_p": [0, 0.0, 1e-46, 1.5e-45, 1.1e-38, float(np.finfo(np.float32).tiny), 1, 1.0000001,
              np.float32(1e-45), *NAN_INF, True],
    "top_k": [-1, 0, INT32_MAX, INT32_MAX + 1, False, 0.0],
    "seed": [None, -1, 0, UINT32_MAX, UINT32_MAX + 1, np.uint64(UINT32_MAX + 1), True, 1.0],
    "stop_token_ids": [[], [0], [INT32_MAX], [INT32_MAX + 1], [-1], [True], (3,), np.arange(2), None],
    "ignore_eos": [True, False, np.bool_(True), 0, 1, None, "True"],
}


@pytest.mark.parametrize("field,value", [(k, v) for k, vs in EDGE_VALUES.items() for v in vs])
def test_bounds_match_the_reference_rules(field, value):
    """Every bound exactly: the last valid value and the first invalid one on each side."""
    build_as_the_rules_say(SamplingParams, {field: value}, VALID)


@pytest.mark.parametrize("kw,field", [
    (dict(top_k=2**31), "top_k"),  # the issue: admitted, then overflowed the int32 step array
    (dict(seed=1.5), "seed"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**32), "seed"),
    (dict(temperature="0.5"), "temperature"),
    (dict(top_p=None), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1e-46), "top_p"),  # 0 in float32
    (dict(top_p=1e-40), "top_p"),  # a float32 subnormal: 0 on the device
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=3.0), "max_tokens"),
    (dict(max_tokens=2**31), "max_tokens"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1e39), "temperature"),  # inf in float32
    (dict(temperature=10**400), "temperature"),
    (dict(stop_token_ids=[1, -2]), "stop_token_ids"),
    (dict(stop_token_ids="12"), "stop_token_ids"),
    (dict(stop_token_ids=[1.0]), "stop_token_ids"),
    (dict(stop_token_ids=None), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(ignore_eos="false"), "ignore_eos"),
])
def test_each_bad_field_is_named_with_its_value(kw, field):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kw)
    assert e.value.field == field and str(e.value).startswith(f"{field}")
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError)


def test_error_for_a_huge_value_is_short_and_printable():
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(seed=10**5000)
    assert "16610-bit integer" in str(e.value) and len(str(e.value)) < 200
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(stop_token_ids=list(range(10**6)) + [-1])
    assert len(str(e.value)) < 300 and "stop_token_ids[1000000]" in str(e.value)


def test_numpy_and_int_values_are_normalized():
    p = SamplingParams(max_tokens=np.int64(7), temperature=1, top_p=np.float32(0.5),
                       top_k=np.uint16(3), seed=np.uint32(2**32 - 1),
                       stop_token_ids=np.array([4, 5]), ignore_eos=np.bool_(True))
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop_token_ids, p.ignore_eos) == \
        (7, 1.0, 0.5, 3, 2**32 - 1, (4, 5), True)
    assert type(p.max_tokens) is int and type(p.temperature) is float and type(p.ignore_eos) is bool
    assert dataclasses.replace(p, top_k=4).top_k == 4
    with pytest.raises(InvalidRequest, match="top_k"):
        dataclasses.replace(p, top_k=-4)


def test_problem_reports_a_field_forced_past_the_frozen_dataclass():
    p = SamplingParams()
    assert p.problem() is None
    object.__setattr__(p, "top_k", 2**40)
    assert p.problem().startswith("top_k must be an integer in [0, 2147483647]")


def test_from_dict():
    assert SamplingParams.from_dict({"max_tokens": 3, "stop_token_ids": None, "seed": None}) == \
        SamplingParams(max_tokens=3)
    with pytest.raises(InvalidRequest, match="unknown sampling field.*'bogus'"):
        SamplingParams.from_dict({"bogus": 1})
    with pytest.raises(InvalidRequest, match="must be an object"):
        SamplingParams.from_dict([("max_tokens", 3)])
    with pytest.raises(InvalidRequest, match="temperature"):
        SamplingParams.from_dict({"temperature": None})

"""`Request` checks its fields when built or assigned (a bad arrival time, id, prompt or model
never reaches the engine), and the contract names are exported at the top level."""

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from field_rules import (
    NAN_INF,
    build_as_the_rules_say,
    field_values,
    is_int,
    number_in,
    token_ids_ok,
    utf8,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fineserve_jax.core.field_checks import FLOAT32_MAX, INT32_MAX, InvalidRequest
from fineserve_jax.core.request import Request
from fineserve_jax.core.sampling_params import SamplingParams


def prompt_ok(v):
    return utf8(v) if isinstance(v, str) else token_ids_ok(v)


# The reference rules (tests/field_rules.py is independent of fineserve_jax.core.field_checks).
VALID = {
    "model": lambda v: isinstance(v, str) and utf8(v),
    "prompt": prompt_ok,
    "sampling": lambda v: isinstance(v, SamplingParams),
    "arrival_s": lambda v: number_in(v, 0.0),
    "slo_ttft_s": lambda v: v is None or number_in(v, 0.0, lo_open=True),
    "request_id": lambda v: v is None or (is_int(v) and 0 <= v < 2**63),
}
BAD_TEXT = ["m\ud800", "\udfff", "ok\udc80ok", "\ud83d"]  # lone surrogates
PLAUSIBLE = {
    "model": st.text(max_size=3) | st.sampled_from(BAD_TEXT),
    "prompt": st.text(max_size=5) | st.sampled_from(BAD_TEXT)
    | st.lists(st.integers(-1, 2**31) | st.sampled_from([-1, 0, INT32_MAX, INT32_MAX + 1, True]),
               max_size=4),
    "sampling": st.just(SamplingParams(max_tokens=2)),
    "arrival_s": st.sampled_from([*NAN_INF, -0.0, -1e-300, 0, FLOAT32_MAX, 1e39])
    | st.floats(-1, 1e6) | st.integers(-1, 10),
    "slo_ttft_s": st.none() | st.sampled_from([*NAN_INF, 0, 0.0, -0.0, 1e-300]) | st.floats(-1, 10),
    "request_id": st.none() | st.sampled_from([-1, 0, 2**63 - 1, 2**63, True, 1.0])
    | st.integers(-1, 2**64),
}
BASE = {"model": "m", "prompt": [1, 2]}


@settings(max_examples=500, deadline=None)
@given(field_values(VALID, PLAUSIBLE, BASE))
def test_construction_succeeds_exactly_when_every_field_is_valid(kw):
    r = build_as_the_rules_say(Request, kw, VALID)
    if r is None:
        return
    assert type(r.arrival_s) is float and (r.slo_ttft_s is None or type(r.slo_ttft_s) is float)
    assert r.request_id is None or type(r.request_id) is int
    assert isinstance(r.prompt, str) or (isinstance(r.prompt, list)
                                         and all(type(t) is int for t in r.prompt))


EDGE_VALUES = {
    "model": ["", "m", "m\ud800", b"m", None],
    "prompt": ["", "\udfff", [], [0], [INT32_MAX], [INT32_MAX + 1], [-1], [True], (1,), np.arange(2),
               np.array([1.0]), np.zeros((1, 1), np.int32), b"ab", None],
    "arrival_s": [0, -0.0, -1e-300, FLOAT32_MAX, 1e39, *NAN_INF, True, "0", None],
    "slo_ttft_s": [None, 0, 0.0, 1e-300, -1.0, *NAN_INF, True, "1"],
    "request_id": [None, -1, 0, 2**63 - 1, 2**63, np.uint64(2**63), True, 1.0],
}


@pytest.mark.parametrize("field,value", [(k, v) for k, vs in EDGE_VALUES.items() for v in vs])
def test_bounds_match_the_reference_rules(field, value):
    """Every bound exactly: the last valid value and the first invalid one on each side."""
    build_as_the_rules_say(Request, {**BASE, field: value}, VALID)


@pytest.mark.parametrize("kw,field", [
    (dict(arrival_s=math.nan), "arrival_s"),  # the issue: run() spun at 100 % CPU forever
    (dict(arrival_s=math.inf), "arrival_s"),
    (dict(arrival_s="0.5"), "arrival_s"),  # the issue: aborted the whole run()
    (dict(arrival_s=-1.0), "arrival_s"),
    (dict(slo_ttft_s=0.0), "slo_ttft_s"),
    (dict(slo_ttft_s=math.nan), "slo_ttft_s"),
    (dict(request_id=-1), "request_id"),
    (dict(request_id=1.0), "request_id"),
    (dict(request_id=True), "request_id"),
    (dict(prompt="caf\ud800"), "prompt"),  # the issue: a surrogate in a text prompt
    (dict(prompt=[1, "x"]), "prompt"),
    (dict(prompt=[1, -1]), "prompt"),
    (dict(prompt=[1, 2**31]), "prompt"),
    (dict(prompt=b"bytes"), "prompt"),
    (dict(prompt=None), "prompt"),
    (dict(model=3), "model"),
    (dict(sampling={"max_tokens": 3}), "sampling"),
    (dict(sampling=None), "sampling"),
])
def test_each_bad_field_is_named(kw, field):
    with pytest.raises(InvalidRequest) as e:
        Request(**{"model": "m", "prompt": [1, 2], **kw})
    assert e.value.field == field and str(e.value).startswith(field)


def test_assignment_and_replace_are_checked_too():
    r = Request("m", np.array([1, 2, 3], np.int64), arrival_s=np.float32(0.5), request_id=np.int64(4))
    assert r.prompt == [1, 2, 3] and type(r.prompt[0]) is int and r.request_id == 4
    with pytest.raises(InvalidRequest, match="arrival_s"):
        r.arrival_s = math.nan
    with pytest.raises(InvalidRequest, match="arrival_s"):
        dataclasses.replace(r, arrival_s=-3)
    assert r.arrival_s == 0.5
    r.arrival_s = 2  # ints are fine for float fields
    assert r.arrival_s == 2.0 and type(r.arrival_s) is float


def test_surrogate_error_says_where():
    with pytest.raises(InvalidRequest, match=r"prompt is not valid text: surrogates not allowed at index 3"):
        Request("m", "abc\udc80def")


def test_top_level_exports_and_host_side_imports_stay_jax_free():
    code = (
        "import sys, fineserve_jax\n"
        "from fineserve_jax import Request, SamplingParams, InvalidRequest, metrics\n"
        "import fineserve_jax.kvslab, fineserve_jax.scheduler, fineserve_jax.workload\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
        "assert {'Engine', 'ModelSpec', 'Request', 'SamplingParams', 'LLM', 'load_model',"
        " 'metrics'} <= set(fineserve_jax.__all__) <= set(dir(fineserve_jax))\n"
        "from fineserve_jax import Engine, ModelSpec, LLM, load_model\n"
        "from fineserve_jax.engine.device_engine import Engine as E, ModelSpec as M\n"
        "assert Engine is E and ModelSpec is M and callable(load_model)\n"
        "assert Request is fineserve_jax.core.request.Request\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

"""Type and range checks for user-given request fields (pure Python + numpy, no JAX).

`SamplingParams` and `Request` run every field through these when they are built, so a value
that would later overflow a device array (`top_k=2**31` into int32), break a comparison
(`temperature="0.5"`) or never arrive (`arrival_s=nan`) is refused at the door with an error
that names the field and the value, instead of failing inside a step shared with other
requests.

Rules: integers are `int` or numpy integers (never `bool`, never floats, not even `3.0`);
floats accept ints and numpy reals and must be finite; bools are `bool` or `numpy.bool_`.
"""

from __future__ import annotations

import math
import numbers
import operator
import reprlib
from typing import List, Optional

import numpy as np

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
INT64_MAX = 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
# The smallest normal float32. XLA on CPU flushes subnormals to zero, so a smaller positive
# value is 0 on the device (measured: top_p = 1e-45 or 1.1e-38 kept no token at all).
FLOAT32_TINY = float(np.finfo(np.float32).tiny)

_SHOW = reprlib.Repr()
_SHOW.maxstring = 60
_SHOW.maxother = 60
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = 6
_SHOW.maxlevel = 2


class InvalidRequest(ValueError, TypeError):
    """A request or sampling field of the wrong type or out of range.

    It is both a ValueError and a TypeError so callers that catch either keep working;
    `field` names the field, `value` holds what was given.
    """

    def __init__(self, message: str, field: Optional[str] = None, value: object = None):
        super().__init__(message)
        self.field = field
        self.value = value


def show(value: object, with_type: bool = True) -> str:
    """A short, always-printable description of `value` for error messages (a 100k-digit int
    or a million-element list must not make the error itself fail or flood the log)."""
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
            text = f"<{value.bit_length()}-bit integer{' (negative)' if value < 0 else ''}>"
        else:
            text = _SHOW.repr(value)
    except Exception:  # a user object whose __repr__ raises
        text = "<unprintable>"
    return f"{text} ({type(value).__name__})" if with_type else text


def fail(field: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(f"{field} must be {expected}, got {show(value)}", field, value)


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_int(field: str, value, lo: int, hi: int) -> int:
    """`value` as a Python int in [lo, hi]; bools and floats are refused."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise fail(field, f"an integer in [{lo}, {hi}]", value)
    v = operator.index(value)
    if not lo <= v <= hi:
        raise fail(field, f"an integer in [{lo}, {hi}]", value)
    return v


def check_float(field: str, value, lo: float, hi: float = FLOAT32_MAX, lo_open: bool = False,
                what: Optional[str] = None) -> float:
    """`value` as a finite Python float in [lo, hi] ((lo, hi] if `lo_open`); ints accepted.
    The default upper bound keeps the value finite once stored as float32 on the device."""
    if what is None:
        lower = f"{'>' if lo_open else '>='} {lo:g}"
        what = (f"a finite number {lower} (and within float32 range)" if hi == FLOAT32_MAX
                else f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    expected = what
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise fail(field, expected, value)
    try:
        v = float(value)
    except (OverflowError, ValueError, TypeError):  # an int too large for a float
        raise fail(field, expected, value) from None
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
        raise fail(field, expected, value)
    return v


def check_bool(field: str, value) -> bool:
    if not _is_bool(value):
        raise fail(field, "a bool", value)
    return bool(value)


def check_str(field: str, value) -> str:
    """A str that encodes as UTF-8 (no lone surrogates, which no tokenizer can take)."""
    if not isinstance(value, str):
        raise fail(field, "a str", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"{field} is not valid text: {e.reason} at index {e.start} "
                             f"({value[e.start:e.end]!a})", field, value) from None
    return value


def check_token_ids(field: str, value, expected: str = "a list of integer token ids") -> List[int]:
    """A list/tuple (or 1-D integer numpy array) of token ids, each an int in [0, INT32_MAX]
    (the device's int32), as a list of Python ints."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
            raise fail(field, "a 1-D array of integer token ids", value)
        value = value.tolist()
    elif not isinstance(value, (list, tuple)):
        raise fail(field, expected, value)
    # Fast path (every prompt passes here): plain ints in range, checked in C loops.
    if all(type(t) is int for t in value) and (not value or (min(value) >= 0 and max(value) <= INT32_MAX)):
        return list(value)
    out = []
    for i, t in enumerate(value):
        if _is_bool(t) or not isinstance(t, numbers.Integral) or not 0 <= operator.index(t) <= INT32_MAX:
            raise InvalidRequest(f"{field}[{i}] must be a token id in [0, {INT32_MAX}], got "
                                 f"{show(t)}", field, value)
        out.append(operator.index(t))
    return out

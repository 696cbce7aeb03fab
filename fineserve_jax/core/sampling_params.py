"""Per-request sampling parameters (pure Python)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from fineserve_jax.core.field_checks import (
    FLOAT32_TINY,
    INT32_MAX,
    UINT32_MAX,
    InvalidRequest,
    check_bool,
    check_float,
    check_int,
    check_token_ids,
    show,
)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 disable them.

    `seed` makes sampling deterministic per request, whatever else shares the batch (the key
    of token i is `fold_in(PRNGKey(seed), i)`); None derives it from the request id.
    Generation stops at `max_tokens`, at any of `stop_token_ids`, or at the model's EOS
    unless `ignore_eos`.

    Every field is checked when the object is built (`InvalidRequest` names the field and the
    value): the ranges are those of the device arrays the values go into (max_tokens, top_k
    and stop ids int32, seed uint32, temperature and top_p finite float32).
    Ints are normalized to Python ints, floats to Python floats, stop ids to a tuple.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        for name, value in _checked_fields(self).items():
            object.__setattr__(self, name, value)

    def problem(self) -> Optional[str]:
        """A reason these parameters are invalid, or None. Construction already checks every
        field, so this is None unless a field was forced past the frozen dataclass."""
        try:
            _checked_fields(self)
        except InvalidRequest as e:
            return str(e)
        return None

    @classmethod
    def from_dict(cls, d: Mapping) -> "SamplingParams":
        """From a JSON-like mapping of field names; unknown names and JSON null for any field
        but `seed` (null: derive it) and `stop_token_ids` (null: none) are refused."""
        if not isinstance(d, Mapping):
            raise InvalidRequest(f"sampling parameters must be an object, got {show(d)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in fields]
        if unknown:
            names = sorted(show(k, with_type=False) for k in unknown)
            raise InvalidRequest(f"unknown sampling field(s): {', '.join(names)}; valid: "
                                 f"{', '.join(sorted(fields))}", str(unknown[0]), d)
        kw = dict(d)
        if kw.get("stop_token_ids", ()) is None:
            kw["stop_token_ids"] = ()
        return cls(**kw)


def _checked_fields(p: SamplingParams) -> dict:
    """Every field of `p`, checked and normalized (raises InvalidRequest)."""
    return {
        "max_tokens": check_int("max_tokens", p.max_tokens, 1, INT32_MAX),
        "temperature": check_float("temperature", p.temperature, 0.0),
        "top_p": _check_top_p(p.top_p),
        "top_k": check_int("top_k", p.top_k, 0, INT32_MAX),
        "seed": None if p.seed is None else check_int("seed", p.seed, 0, UINT32_MAX),
        "stop_token_ids": tuple(check_token_ids("stop_token_ids", p.stop_token_ids)),
        "ignore_eos": check_bool("ignore_eos", p.ignore_eos),
    }


def _check_top_p(value) -> float:
    v = check_float("top_p", value, 0.0, 1.0, lo_open=True)
    if not np.float32(v) >= FLOAT32_TINY:  # 0 on the device: the kernel would keep no token
        raise InvalidRequest(f"top_p must be in (0, 1] and at least {FLOAT32_TINY:.4g} (the smallest "
                             f"normal float32), got {show(value)}", "top_p", value)
    return v


def stop_ids(params: SamplingParams, eos_token_id: Optional[int]) -> Sequence[int]:
    ids = set(params.stop_token_ids)
    if eos_token_id is not None and not params.ignore_eos:
        ids.add(int(eos_token_id))
    return ids

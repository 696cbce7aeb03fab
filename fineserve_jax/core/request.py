"""Requests and their lifecycle (pure Python: the scheduler and simulator use it too).

Every request ends exactly once: `finished` (tokens and a finish reason), `dropped` (the
scheduler judged its SLO unreachable) or `failed` (with a reason).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import List, Optional, Sequence, Union

from fineserve_jax.core.field_checks import (
    INT64_MAX,
    check_float,
    check_int,
    check_str,
    check_token_ids,
    fail,
)
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.metrics import RequestRecord


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted into KV memory (new or preempted)
    RUNNING = "running"  # holds KV blocks; prefilling or decoding
    FINISHED = "finished"
    DROPPED = "dropped"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (Status.FINISHED, Status.DROPPED, Status.FAILED)


@dataclasses.dataclass
class Request:
    """What a user submits. `prompt` is text or token ids.

    Every field is checked when it is set, at construction and on later assignment
    (`InvalidRequest` names the field and the value): `model` a str; `prompt` a str that
    encodes as UTF-8, or a list/tuple/1-D integer array of token ids in [0, 2**31) (stored as
    a list of Python ints); `sampling` a `SamplingParams`; `arrival_s` finite and >= 0;
    `slo_ttft_s` None or finite and > 0; `request_id` None or an int in [0, 2**63).
    """

    model: str
    prompt: Union[str, Sequence[int]]
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    arrival_s: float = 0.0
    slo_ttft_s: Optional[float] = None
    request_id: Optional[int] = None

    def __setattr__(self, name, value):
        check = _REQUEST_FIELD_CHECKS.get(name)
        super().__setattr__(name, check(value) if check is not None else value)


def _check_prompt(value):
    if isinstance(value, str):
        return check_str("prompt", value)
    return check_token_ids("prompt", value, expected="a str or a list of integer token ids")


def _check_sampling(value) -> SamplingParams:
    if not isinstance(value, SamplingParams):
        raise fail("sampling", "a SamplingParams", value)
    return value


_REQUEST_FIELD_CHECKS = {
    "model": lambda v: check_str("model", v),
    "prompt": _check_prompt,
    "sampling": _check_sampling,
    "arrival_s": lambda v: check_float("arrival_s", v, 0.0),
    "slo_ttft_s": lambda v: None if v is None else check_float("slo_ttft_s", v, 0.0, lo_open=True),
    "request_id": lambda v: None if v is None else check_int("request_id", v, 0, INT64_MAX),
}


@dataclasses.dataclass(eq=False, slots=True)
class RequestState:
    """The engine's and scheduler's view of one request while it lives."""

    request_id: int
    model: str
    prompt_token_ids: List[int]
    sampling: SamplingParams
    arrival_s: float
    slo_ttft_s: Optional[float]
    stop_ids: frozenset = frozenset()
    max_len: int = 1 << 30  # prompt + output may not exceed the model's context
    status: Status = Status.WAITING
    output_token_ids: List[int] = dataclasses.field(default_factory=list)
    block_ids: List[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the arena
    first_token_s: Optional[float] = None
    token_times_s: List[float] = dataclasses.field(default_factory=list)
    finish_s: Optional[float] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    preemptions: int = 0
    admitted_s: Optional[float] = None  # the latest admission into KV memory
    first_admitted_s: Optional[float] = None  # the first (queueing delay = this - arrival)
    low_priority: bool = False  # SLO judged unreachable but dropping is off
    cache_chain: List[int] = dataclasses.field(default_factory=list)  # prefix-cache node per full block
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)

    @property
    def deadline_s(self) -> float:
        return self.arrival_s + (self.slo_ttft_s if self.slo_ttft_s is not None else float("inf"))

    def token_slice(self, start: int, stop: int) -> List[int]:
        """Tokens [start, stop) of prompt + output, without copying the whole sequence
        (this runs for every row of every step)."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    # The two properties below run for every running request in every scheduling round:
    # written out without nested property calls.
    @property
    def num_pending_prefill(self) -> int:
        """Tokens still to run through prefill (all but the last one once decoding)."""
        out = len(self.output_token_ids)
        pending = len(self.prompt_token_ids) + out - self.num_computed
        return 0 if (out and pending == 1) or pending < 0 else pending

    @property
    def in_decode(self) -> bool:
        # Decoding: every token but the newest is cached and an output token exists.
        out = len(self.output_token_ids)
        return out > 0 and self.num_computed == len(self.prompt_token_ids) + out - 1

    def end(self, status: Status, now: float, reason: Optional[str] = None) -> None:
        if self.status.is_final:
            raise RuntimeError(f"request {self.request_id} ended twice ({self.status} then {status})")
        self.status = status
        self.finish_s = now
        if status is Status.FAILED:
            self.error = reason
        else:
            self.finish_reason = reason

    def to_record(self, preset: Optional[str] = None) -> RequestRecord:
        """The metrics record of this request (the engine and the simulator share it)."""
        return RequestRecord(
            request_id=self.request_id, model=self.model, arrival_s=self.arrival_s,
            first_token_s=self.first_token_s, token_times_s=list(self.token_times_s) or None,
            finish_s=self.finish_s, num_output_tokens=len(self.output_token_ids),
            status=self.status.value, finish_reason=self.finish_reason or self.error,
            slo_ttft_s=self.slo_ttft_s, preemptions=self.preemptions,
            prompt_len=len(self.prompt_token_ids), preset=preset,
            cached_tokens=self.num_cached_tokens)

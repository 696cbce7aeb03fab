"""Requests and their lifecycle (pure Python: the scheduler and simulator use it too).

Every request ends exactly once: `finished` (tokens and a finish reason), `dropped` (the
scheduler judged its SLO unreachable) or `failed` (with a reason).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import List, Optional, Sequence, Union

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
    """What a user submits. `prompt` is text or token ids."""

    model: str
    prompt: Union[str, Sequence[int]]
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    arrival_s: float = 0.0
    slo_ttft_s: Optional[float] = None
    request_id: Optional[int] = None


@dataclasses.dataclass(eq=False)
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
    admitted_s: Optional[float] = None
    low_priority: bool = False  # SLO judged unreachable but dropping is off

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

    @property
    def num_pending_prefill(self) -> int:
        """Tokens still to run through prefill (all but the last one once decoding)."""
        return max(self.num_tokens - self.num_computed, 0) if not self.in_decode else 0

    @property
    def in_decode(self) -> bool:
        # Decoding: every token but the newest is cached and an output token exists.
        return bool(self.output_token_ids) and self.num_computed == self.num_tokens - 1

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
            prompt_len=len(self.prompt_token_ids), preset=preset)

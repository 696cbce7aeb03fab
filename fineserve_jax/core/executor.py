"""The one seam between the device loop and what runs its steps (pure Python).

An executor runs a `StepPlan` and says how long it took. The engine's executor builds the
bucket's batch and runs the compiled step on the device; the simulator's asks a cost model;
`FixedCostExecutor` charges fixed costs (tests and host-overhead benchmarks: it is not a
model of any device and says so in its name). Block operations between steps (compaction
copies, debug poisoning of freed blocks) go through the executor too; executors without
device memory ignore them.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

from fineserve_jax.core.step_plan import StepPlan, StepResult


class RequestFault(Exception):
    """Raised by an executor when one request of a plan cannot be run (e.g. its row could
    not be built); the loop fails that request alone and goes on."""

    def __init__(self, seq, reason: str):
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


class Executor(Protocol):
    #: the loop hands freed block ids to `release_blocks` only when this is True
    wants_freed_blocks: bool

    def run(self, plan: StepPlan, while_running: Callable[[], None]) -> StepResult:
        """Run `plan`. Call `while_running()` exactly once, after the step is dispatched
        and before waiting for its tokens (the host overlaps its work with the device)."""
        ...

    def copy_blocks(self, block_bytes: int, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy KV blocks src[i] -> dst[i] (compaction; all sources read first)."""
        ...

    def release_blocks(self, block_bytes: int, block_ids: Sequence[int]) -> None:
        """Blocks just freed (the engine poisons them in debug mode)."""
        ...

    def recover(self) -> Optional[str]:
        """After a step raised: None if device state survived, else a reason why every KV
        block was lost (the executor has rebuilt it; the loop recomputes running requests)."""
        ...


class HostOnlyExecutor:
    """Base of executors without device memory: block operations are nothing to do."""

    wants_freed_blocks = False

    def copy_blocks(self, block_bytes: int, src: Sequence[int], dst: Sequence[int]) -> None:
        pass

    def release_blocks(self, block_bytes: int, block_ids: Sequence[int]) -> None:
        pass

    def recover(self) -> Optional[str]:
        return None


class FixedCostExecutor(HostOnlyExecutor):
    """Not a device: every prefill step takes `prefill_s_per_token` x tokens (plus
    `prefill_s`), every decode step `decode_s`, and every sampled token is `token`.
    Outcomes are therefore exact and hand-computable (scheduler tests, benchmarks of the
    host side)."""

    def __init__(self, prefill_s: float = 0.0, prefill_s_per_token: float = 1e-3,
                 decode_s: float = 2e-3, token: int = 7):
        self.prefill_s, self.prefill_s_per_token = prefill_s, prefill_s_per_token
        self.decode_s, self.token = decode_s, token
        self.steps = 0

    def run(self, plan: StepPlan, while_running: Callable[[], None]) -> StepResult:
        while_running()
        self.steps += 1
        dt = (self.prefill_s + self.prefill_s_per_token * plan.num_tokens
              if plan.kind == "prefill" else self.decode_s)
        return StepResult([self.token] * len(plan.seqs), dt)

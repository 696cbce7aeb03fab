"""The engine's executor: runs a step plan on the device.

It owns the device state of one engine: the KV arena (donated to every compiled step and
rebound), each model's compiled steps (`ModelRunner`), the bucket shapes, and the compiled
whole-block operations. A step: pick the bucket, fill its fixed-shape numpy arrays (the batch
builder), dispatch the compiled step, let the host work while the device runs, read the
sampled tokens back.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from fineserve_jax.core.buckets import Buckets
from fineserve_jax.core.executor import RequestFault
from fineserve_jax.core.step_plan import StepPlan, StepResult
from fineserve_jax.engine.block_ops import BlockOps
from fineserve_jax.engine.model_runner import ModelRunner
from fineserve_jax.engine.step_inputs import build_decode, build_prefill
from fineserve_jax.kvslab import arena as arena_lib


class DeviceExecutor:
    """`core.executor.Executor` over compiled steps and one KV arena."""

    def __init__(self, runners: Dict[str, ModelRunner], arena, buckets: Buckets,
                 tokens_per_block: int, block_ops: BlockOps, debug_poison: bool = False):
        self.runners = runners
        self.arena = arena
        self._arena_shape, self._arena_sharding = arena.shape, arena.sharding
        self.buckets = buckets
        self.tokens_per_block = tokens_per_block
        self.block_ops = block_ops
        self.wants_freed_blocks = debug_poison  # freed blocks are poisoned with NaN bits

    def _build(self, plan: StepPlan, size: int, seqs, chunks):
        b, t = self.buckets, self.tokens_per_block
        if plan.kind == "prefill":
            return build_prefill(seqs, chunks, size, b.prefill_seqs, b.table_width, t)
        return build_decode(seqs, size, b.table_width, t)

    def build_inputs(self, plan: StepPlan, size: int):
        """The step's inputs; a row that cannot be built is reported as that request's fault."""
        try:
            return self._build(plan, size, plan.seqs, plan.chunks)
        except Exception:
            for s, n in zip(plan.seqs, plan.chunks):  # find the row that breaks it
                try:
                    self._build(plan, size, [s], [n])
                except Exception as e:  # noqa: BLE001
                    raise RequestFault(s, f"{type(e).__name__}: {e}") from e
            raise

    def run(self, plan: StepPlan, while_running: Callable[[], None]) -> StepResult:
        size = self.buckets.bucket(plan.kind, plan.size)
        x = self.build_inputs(plan, size)
        t0 = time.perf_counter()
        self.arena, tokens = self.runners[plan.model].run(plan.kind, size, self.arena, x)
        tokens.copy_to_host_async()
        while_running()
        # If the host work outlasted the step, the elapsed time measures the host, not the
        # device: then it is not fed to the step-time profile.
        device_bound = not tokens.is_ready()
        host_tokens = np.asarray(tokens)
        seconds = time.perf_counter() - t0
        return StepResult(host_tokens[: len(plan.seqs)].tolist(), seconds, size,
                          seconds if device_bound else None)

    def copy_blocks(self, block_bytes: int, src: Sequence[int], dst: Sequence[int]) -> None:
        self.arena = self.block_ops.copy(self.arena, block_bytes, src, dst)

    def release_blocks(self, block_bytes: int, block_ids: Sequence[int]) -> None:
        if self.wants_freed_blocks:
            self.arena = self.block_ops.poison(self.arena, block_bytes, block_ids)

    def recover(self) -> Optional[str]:
        """A step raised. The arena was donated to it: if that buffer is gone, every block's
        KV is lost; a fresh zeroed arena of the same shape takes its place."""
        if not self.arena.is_deleted():
            return None
        num_slabs, slab_words = self._arena_shape
        # The same shape on the same devices (on a group: rows split as before).
        self.arena = arena_lib.make_arena(num_slabs, slab_words * 4, device=self._arena_sharding)
        return "the KV arena was lost with the failed step"

"""The model's attention backend over the shared KV arena (one step, traced under jit).

Per layer: write the new tokens' K/V into their blocks (quantized per the model's KV
format), then attend over the arena through the format's typed view. The arena is carried
as state of the backend object during tracing and returned by the step.
"""

from __future__ import annotations

import pallas_kernels
from fineserve_jax.engine.step_inputs import StepInputs
from fineserve_jax.formats import KVFormat
from fineserve_jax.kvslab import arena as arena_lib


class PagedAttention:
    def __init__(self, arena, fmt: KVFormat, kind: str, inputs: StepInputs, impl: str):
        self.arena, self.fmt, self.kind, self.x, self.impl = arena, fmt, kind, inputs, impl

    def __call__(self, layer: int, q, k, v):
        b, t, hq, d = q.shape
        n = b * t
        self.arena = arena_lib.write_kv(self.arena, self.fmt, layer, k.reshape(n, -1, d),
                                        v.reshape(n, -1, d), self.x.slot_block,
                                        self.x.slot_offset)
        view = arena_lib.typed_view(self.arena, self.fmt)
        if self.kind == "decode":
            out = pallas_kernels.decode_attention(
                q.reshape(n, hq, d), view, self.x.block_tables, self.x.lengths,
                fmt=self.fmt, layer=layer, impl=self.impl)
        else:
            out = pallas_kernels.prefill_attention(
                q.reshape(n, hq, d), view, self.x.block_tables, self.x.q_seq, self.x.q_pos,
                fmt=self.fmt, layer=layer, impl=self.impl)
        return out.reshape(b, t, hq, d)

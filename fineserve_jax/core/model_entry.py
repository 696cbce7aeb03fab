"""The per-device loop's and the scheduler's static knowledge of one served model (pure
Python): the same entry describes a compiled model in the engine and a cost-model model in
the simulator."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """What one model's steps can take (the engine's largest buckets, the simulator's
    configured limits)."""

    max_prefill_tokens: int
    max_prefill_seqs: int
    max_decode_seqs: int


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model on a device.

    block_bytes / tokens_per_block: its KV block format; max_len: prompt + output may not
    reach it (the context); vocab_size: token ids must lie below it (None: unchecked, e.g.
    in the simulator, whose prompts are lengths only); eos_token_id: the model's end token.
    """

    name: str
    preset: str
    block_bytes: int
    tokens_per_block: int
    limits: ModelLimits
    max_len: int = 1 << 30
    vocab_size: Optional[int] = None
    eos_token_id: Optional[int] = None

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

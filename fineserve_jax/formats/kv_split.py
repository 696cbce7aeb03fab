"""How a model's KV heads spread over the `tp` devices of a tensor-parallel group (pure Python).

The engine stores each device's KV heads in that device's part of the arena; the planner and
the simulator count the same bytes. With fewer KV heads than devices each KV head is
replicated, so the group stores `local_heads * tp` head rows per token, more than the model
has: footprints must count the copies.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KVSplit:
    """How a model's KV heads spread over `tp` devices.

    local_heads: KV heads in each device's part of the arena; replication: how many devices
    hold the same KV head (1 = split, no copy). With fewer KV heads than devices each KV head
    is replicated on `tp / num_kv_heads` devices, as vLLM does, so every device still holds
    exactly the KV head its query heads read.
    """

    tp: int
    num_heads: int
    num_kv_heads: int
    local_heads: int
    replication: int

    @property
    def sharded(self) -> bool:
        """True when each device holds a distinct slice of the KV heads."""
        return self.replication == 1 and self.tp > 1

    @property
    def stored_heads(self) -> int:
        """KV heads stored by the whole group, replicas included (`num_kv_heads` * replication)."""
        return self.local_heads * self.tp


def kv_split(num_heads: int, num_kv_heads: int, tp: int) -> KVSplit:
    """The split of `num_kv_heads` over `tp` devices; ValueError when the heads cannot split."""
    if tp < 1:
        raise ValueError(f"tensor parallelism must be >= 1, got {tp}")
    if tp == 1:
        return KVSplit(1, num_heads, num_kv_heads, num_kv_heads, 1)
    if num_heads % tp:
        raise ValueError(f"tensor parallelism {tp} needs the query heads ({num_heads}) to split "
                         f"evenly over the devices")
    if num_kv_heads % tp == 0:
        return KVSplit(tp, num_heads, num_kv_heads, num_kv_heads // tp, 1)
    if tp % num_kv_heads == 0:
        return KVSplit(tp, num_heads, num_kv_heads, 1, tp // num_kv_heads)
    raise ValueError(f"tensor parallelism {tp} with {num_kv_heads} KV heads: need KV heads "
                     f"divisible by tp (split) or tp divisible by KV heads (replicated)")


def tp_fits_heads(num_heads: int, num_kv_heads: int, tp: int) -> bool:
    """Whether a model with these heads can run with tensor parallelism `tp`."""
    try:
        kv_split(num_heads, num_kv_heads, tp)
    except ValueError:
        return False
    return True

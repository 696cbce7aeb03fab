"""`arena_bytes="auto"`: size the shared KV arena from what the engine can run at once.

An arena too small for the largest decode bucket caps the batch (measured on SmolLM2-135M,
CPU: a 16 MiB arena held ~6 sequences of 512 tokens, 36 tok/s; 256 MiB held the whole
bucket of 32, 121 tok/s). "auto" gives every model room for its largest decode bucket plus
one packed prefill at full context, i.e. the size at which the arena never limits the batch,
capped by the memory the device has left.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

# Fraction of free device memory (GPU) or of physical memory (CPU, shared with everything
# else on the host) that "auto" may take.
GPU_FRACTION = 0.9
CPU_FRACTION = 0.25


def wanted_arena_bytes(block_bytes: Iterable[int], blocks_per_seq: Iterable[int],
                       seqs_per_model: int, slab_bytes: int) -> int:
    """Bytes for `seqs_per_model` full-context sequences of every model at once.

    block_bytes[i], blocks_per_seq[i]: per model (per device of its group). Rounded up to
    whole slabs, plus one slab per model (a partly used slab per format) and the reserved
    slab 0.
    """
    block_bytes, blocks_per_seq = list(block_bytes), list(blocks_per_seq)
    need = sum(b * n * seqs_per_model for b, n in zip(block_bytes, blocks_per_seq))
    return (-(-need // slab_bytes) + len(block_bytes) + 1) * slab_bytes


def memory_cap_bytes(device, reserved_bytes: int = 0) -> Tuple[Optional[int], str]:
    """The most "auto" may take on `device` (a jax Device) and where the figure comes from.

    GPU: `GPU_FRACTION` of what the allocator reports free (limit - in use, which already
    holds the loaded weights) minus `reserved_bytes`. CPU: `CPU_FRACTION` of physical memory.
    None when neither is known.
    """
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats (CPU) raise or return None
        stats = None
    if stats and stats.get("bytes_limit"):
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0) - reserved_bytes
        return max(int(free * GPU_FRACTION), 0), "device memory_stats"
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None, "unknown"
    return int(phys * CPU_FRACTION), "host physical memory"


def auto_arena_bytes(block_bytes, blocks_per_seq, seqs_per_model: int, slab_bytes: int,
                     device) -> Tuple[int, str]:
    """(arena bytes, a sentence saying how they were chosen) for `arena_bytes="auto"`."""
    want = wanted_arena_bytes(block_bytes, blocks_per_seq, seqs_per_model, slab_bytes)
    cap, source = memory_cap_bytes(device)
    if cap is not None and want > cap:
        got = max(cap // slab_bytes, 2) * slab_bytes
        return got, (f"auto: {got / 2**20:.1f} MiB, capped by {source} (full batches of "
                     f"{seqs_per_model} sequences would need {want / 2**20:.1f} MiB)")
    return want, (f"auto: {want / 2**20:.1f} MiB = {seqs_per_model} full-context sequences "
                  f"per model")

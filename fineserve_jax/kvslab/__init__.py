"""KV slab memory: host-side allocator, slab sizing and compaction planning.

Pure Python + numpy: importing this package must not import JAX, so the scheduler, the
simulator and their tests run without it. The device arena and typed views live in
`fineserve_jax.kvslab.arena` (imports JAX; import it explicitly).
"""

from fineserve_jax.kvslab.allocator import (
    FormatStats,
    OutOfKVMemory,
    SlabAllocator,
    block_byte_offset,
)
from fineserve_jax.kvslab.compaction import (
    BlockMove,
    CompactionPlan,
    apply_compaction,
    copy_blocks_numpy,
    moves_to_arrays,
    plan_compaction,
    rewrite_block_tables,
)
from fineserve_jax.kvslab.slab_size import (
    SlabSizeChoice,
    choose_slab_bytes,
    device_slab_bytes,
    num_slabs_for_arena,
)

__all__ = [
    "SlabAllocator",
    "OutOfKVMemory",
    "FormatStats",
    "block_byte_offset",
    "SlabSizeChoice",
    "choose_slab_bytes",
    "device_slab_bytes",
    "num_slabs_for_arena",
    "BlockMove",
    "CompactionPlan",
    "plan_compaction",
    "apply_compaction",
    "rewrite_block_tables",
    "copy_blocks_numpy",
    "moves_to_arrays",
]

"""The model's attention backend over the shared KV arena (one step, traced under jit).

Per layer: write the new tokens' K/V into their blocks (quantized per the model's KV
format), then attend over the format's typed view of the arena. Formats that store rotated
rows (int4, `formats.kv_rotation`) get q/k/v rotated before and the output rotated back.
The view is the *cache value* the decoder's layer scan carries: it comes in as an argument
and goes out as the result of every layer, so the arena flows through the step as data. The
backend object holds only static configuration and the step's read-only inputs.

With tensor parallelism (a `DeviceGroup` of tp > 1 devices) the write and the attention run
under `shard_map`: each device sees its rows of the arena view (its KV heads of every block,
`fmt` being the per-device format), its query heads, and its KV heads (sliced from k/v when
they are split over the devices, picked by device index when they are replicated), and the
same block tables; no collective runs inside.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

import pallas_kernels
from fineserve_jax.engine.sharding import AXIS, DeviceGroup, KVSplit
from fineserve_jax.engine.step_inputs import StepInputs
from fineserve_jax.formats import KVFormat
from fineserve_jax.formats.kv_rotation import hadamard_rows, rotates_kv


class PagedAttention:
    """`models.attention.AttentionBackend` over a typed arena view `[num_blocks, block_words]`.

    kind: "decode" (q [B, 1, Hq, D], one token per row) or "prefill" (q [1, N, Hq, D],
    packed tokens); impl: a resolved attention impl (`pallas_kernels.resolve_impl`);
    interpret: the Pallas interpret mode (None: automatic). group/split: the device group
    and how the model's KV heads spread over it (None: one device); `fmt` is then the
    per-device block format and the view `[tp * num_blocks, block_words]` is split by rows.
    """

    def __init__(self, fmt: KVFormat, kind: str, inputs: StepInputs, impl: str,
                 interpret=None, group: Optional[DeviceGroup] = None,
                 split: Optional[KVSplit] = None):
        if kind not in ("decode", "prefill"):
            raise ValueError(f"kind must be 'decode' or 'prefill', got {kind!r}")
        self.fmt, self.kind, self.x, self.impl = fmt, kind, inputs, impl
        self.interpret = interpret
        self.group = group if group is not None and group.tp > 1 else None
        if self.group is not None and (split is None or split.tp != self.group.tp):
            raise ValueError(f"a group of {self.group.tp} devices needs the model's KV split "
                             f"for that tp, got {split}")
        self.split = split
        self.rotate = rotates_kv(fmt.kv_dtype)  # the format stores rotated rows

    def _local(self, view, layer, q, k, v, x: StepInputs):
        """One device's (or the only device's) write + attention. q [B, T, Hq, D], k/v
        [B, T, Hkv, D] (local heads) -> (out [B, T, Hq, D], view)."""
        b, t, hq, d = q.shape
        n = b * t
        if self.rotate:
            q, k, v = hadamard_rows(q), hadamard_rows(k), hadamard_rows(v)
        view = pallas_kernels.write_kv_view(view, self.fmt, layer, k.reshape(n, -1, d),
                                            v.reshape(n, -1, d), x.slot_block, x.slot_offset)
        if self.kind == "decode":
            out = pallas_kernels.decode_attention(
                q.reshape(n, hq, d), view, x.block_tables, x.lengths, fmt=self.fmt,
                layer=layer, impl=self.impl, interpret=self.interpret)
        else:
            out = pallas_kernels.prefill_attention(
                q.reshape(n, hq, d), view, x.block_tables, x.q_seq, x.q_pos, fmt=self.fmt,
                layer=layer, impl=self.impl, interpret=self.interpret)
        out = out.reshape(b, t, hq, d)
        return (hadamard_rows(out) if self.rotate else out), view

    def __call__(self, view, layer, q, k, v):
        if self.group is None:
            return self._local(view, layer, q, k, v, self.x)
        heads = P(None, None, AXIS, None)
        split = self.split
        if split.sharded:
            kv_spec = heads
            fn = self._local
        else:  # each KV head is replicated on `replication` devices: keep this device's
            kv_spec = P()

            def fn(view, layer, q, k, v, x):
                h = lax.axis_index(AXIS) // split.replication
                k = lax.dynamic_slice_in_dim(k, h, 1, axis=2)
                v = lax.dynamic_slice_in_dim(v, h, 1, axis=2)
                return self._local(view, layer, q, k, v, x)

        # check_vma off: Pallas kernels' outputs carry no varying-axes type; the specs
        # say it all (every output is per device).
        return jax.shard_map(
            fn, mesh=self.group.mesh,
            in_specs=(P(AXIS, None), P(), heads, kv_spec, kv_spec, P()),
            out_specs=(heads, P(AXIS, None)), check_vma=False,
        )(view, layer, q, k, v, self.x)

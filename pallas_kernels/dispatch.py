"""One Python interface per attention operation; the implementation is a static `impl`.

impl:
  "reference"      pure jnp (`pallas_kernels.reference`); every backend; the test oracle:
                   gathers each query's whole block-table row.
  "xla"            plain XLA that reads only the blocks the step needs (`xla_attention`:
                   query tiles, a loop over block columns up to the longest live context,
                   online softmax); every backend; the fast path where no kernel runs.
  "cpu"            a C++ kernel called through XLA's FFI (`pallas_kernels.cpu`): reads the
                   live blocks in place and dequantizes in-kernel; CPU backend only, built
                   with the system C++ compiler on first use.
  "pallas_triton"  Pallas with the Triton lowering (`decode_triton`, `prefill_triton`); GPU,
                   or CPU interpreted (`interpret=None` interprets off-GPU automatically).
  "auto"           pallas_triton on a GPU (or when `interpret=True` is asked for) if the
                   format has power-of-2 tiles; on the CPU backend cpu when its kernel
                   builds (`FINESERVE_JAX_CPU_KERNELS=0` turns it off); otherwise xla.
Not implemented yet: "mosaic" (Pallas Mosaic GPU) and "jax_triton"; asking for them raises.

`layer` is an int or an int32 scalar array: inside the decoder's layer scan it is traced,
and every implementation takes it as data (one compiled layer body for every layer).
"""

from __future__ import annotations

import functools
import logging

import jax

from fineserve_jax.formats import KVFormat
from pallas_kernels import reference, xla_attention
from pallas_kernels.cpu.attention import decode_attention_cpu, prefill_attention_cpu
from pallas_kernels.cpu.build import CpuKernelUnavailable, unavailable_reason
from pallas_kernels.decode_triton import decode_attention_triton
from pallas_kernels.layer_arg import check_layer
from pallas_kernels.prefill_triton import prefill_attention_triton
from pallas_kernels.tile_math import check_triton_format
from pallas_kernels.triton_compat import on_gpu, resolve_interpret

log = logging.getLogger("fineserve_jax")

__all__ = ["IMPLS", "resolve_impl", "decode_attention", "prefill_attention"]

IMPLS = ("reference", "xla", "cpu", "pallas_triton", "auto")
_PLANNED = ("mosaic", "jax_triton")


def _triton_ok(fmt: KVFormat) -> bool:
    try:
        check_triton_format(fmt)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _log_fallback(why: str) -> None:
    log.warning("attention impl 'auto' uses the XLA path on this CPU: %s", why)


def resolve_impl(impl: str, fmt: KVFormat, interpret=None) -> str:
    """The concrete implementation `impl` stands for on this backend (never "auto").

    The one place where "auto" is resolved: the engine's runners call it once per model
    with the model's KV format."""
    if impl in _PLANNED:
        raise NotImplementedError(f"attention impl {impl!r} is not implemented yet; "
                                  f"available: {IMPLS}")
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: {IMPLS}")
    if impl == "auto":
        wants_kernel = on_gpu() or interpret is True
        if wants_kernel and _triton_ok(fmt):
            return "pallas_triton"
        if jax.default_backend() == "cpu":
            why = unavailable_reason()
            if why is None:
                return "cpu"
            _log_fallback(why)
        return "xla"
    if impl == "cpu":
        if jax.default_backend() != "cpu":
            raise ValueError(f"attention impl 'cpu' runs on the CPU backend only; this "
                             f"process's default backend is {jax.default_backend()!r}")
        why = unavailable_reason()
        if why is not None:
            raise CpuKernelUnavailable(why)
    return impl


def _check_common(q, kv_view, block_tables, fmt: KVFormat, layer):
    if q.ndim != 3 or q.shape[2] != fmt.head_dim or q.shape[1] % fmt.num_kv_heads:
        raise ValueError(f"q {q.shape} does not fit {fmt.describe()} (need [*, Hq, "
                         f"{fmt.head_dim}] with Hq a multiple of {fmt.num_kv_heads})")
    if kv_view.ndim != 2 or kv_view.shape[1] != fmt.block_words:
        raise ValueError(f"kv_view {kv_view.shape} is not a [num_blocks, {fmt.block_words}] view")
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [rows, width], got {block_tables.shape}")
    return check_layer(fmt, layer)


def decode_attention(q: jax.Array, kv_view: jax.Array, block_tables: jax.Array,
                     lengths: jax.Array, *, fmt: KVFormat, layer, impl: str = "reference",
                     interpret=None, num_splits: int | None = None) -> jax.Array:
    """Decode attention over the arena, one query token per sequence.

    Args:
      q: `[B, Hq, D]` (Hq a multiple of fmt.num_kv_heads; D = fmt.head_dim).
      kv_view: uint32 `[num_blocks, fmt.block_words]` (`arena.typed_view`).
      block_tables: int32 `[B, W]` block ids; lengths: int32 `[B]` (0: padded row -> zeros).
      fmt: static; layer: int or int32 scalar (may be traced). impl: see module doc.
      interpret: Pallas interpret mode (None: automatic). num_splits: split-K factor for
      pallas_triton (None: heuristic).
    Returns: `[B, Hq, D]` in q's dtype; softmax scale 1/sqrt(D), float32 softmax.
    """
    layer = _check_common(q, kv_view, block_tables, fmt, layer)
    if block_tables.shape[0] != q.shape[0] or lengths.shape != (q.shape[0],):
        raise ValueError(f"block_tables {block_tables.shape} / lengths {lengths.shape} do not "
                         f"match batch {q.shape[0]}")
    impl = resolve_impl(impl, fmt, interpret)
    if impl == "reference":
        return reference.decode_attention_reference(q, kv_view, block_tables, lengths, fmt=fmt,
                                                    layer=layer)
    if impl == "xla":
        return xla_attention.decode_attention_xla(q, kv_view, block_tables, lengths, fmt=fmt,
                                                  layer=layer)
    if impl == "cpu":
        return decode_attention_cpu(q, kv_view, block_tables, lengths, fmt=fmt, layer=layer)
    return decode_attention_triton(q, kv_view, block_tables, lengths, fmt=fmt, layer=layer,
                                   interpret=resolve_interpret(interpret),
                                   num_splits=num_splits)


def prefill_attention(q: jax.Array, kv_view: jax.Array, block_tables: jax.Array,
                      q_seq: jax.Array, q_pos: jax.Array, *, fmt: KVFormat, layer,
                      impl: str = "reference", interpret=None) -> jax.Array:
    """Causal prefill attention (chunked prefill, prefix reuse) over the arena.

    Args:
      q: `[N, Hq, D]` packed query tokens; kv_view: uint32 `[num_blocks, block_words]`;
      block_tables: int32 `[S, W]`; q_seq: int32 `[N]` row of block_tables per token;
      q_pos: int32 `[N]` absolute position; the token attends to positions 0..q_pos of its
        sequence, all already in the arena (-1: padding -> zeros). A sequence's tokens are
        contiguous in q and in increasing position order.
    Returns: `[N, Hq, D]` in q's dtype.
    """
    layer = _check_common(q, kv_view, block_tables, fmt, layer)
    if q_seq.shape != (q.shape[0],) or q_pos.shape != (q.shape[0],):
        raise ValueError(f"q_seq {q_seq.shape} / q_pos {q_pos.shape} do not match {q.shape[0]} "
                         f"tokens")
    impl = resolve_impl(impl, fmt, interpret)
    if impl == "reference":
        return reference.prefill_attention_reference(q, kv_view, block_tables, q_seq, q_pos,
                                                     fmt=fmt, layer=layer)
    if impl == "xla":
        return xla_attention.prefill_attention_xla(q, kv_view, block_tables, q_seq, q_pos,
                                                   fmt=fmt, layer=layer)
    if impl == "cpu":
        return prefill_attention_cpu(q, kv_view, block_tables, q_seq, q_pos, fmt=fmt,
                                     layer=layer)
    return prefill_attention_triton(q, kv_view, block_tables, q_seq, q_pos, fmt=fmt, layer=layer,
                                    interpret=resolve_interpret(interpret))

"""Flash-attention tile arithmetic shared by the decode and prefill kernels.

Scores and outputs are accumulated per sub-word plane (see `kv_unpack`): with `e` elements
per packed word, `q . k = sum_k q_k . k_k` and the output plane `k` is `p @ v_k`.
All softmax math is float32 (`MASK` is finite so that `exp(MASK - MASK)` never appears as
`exp(nan)`; masked entries are *selected* away with `where`, never multiplied by 0, so NaN
in a masked row cannot leak).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from fineserve_jax.formats import KVFormat
from pallas_kernels.triton_compat import dot

__all__ = ["MASK", "matmul", "planes_scores", "online_softmax_step", "compute_dtype",
           "is_pow2", "check_triton_format"]

MASK = -0.7 * float(jnp.finfo(jnp.float32).max)

# tl.dot needs every dimension >= 16; smaller tiles (tiny test shapes, a GQA group of a few
# rows) use a broadcast multiply + reduce, which Triton handles on any power-of-2 shape.
_MIN_DOT_DIM = 16


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def check_triton_format(fmt: KVFormat) -> None:
    """Triton tiles need power-of-2 shapes: tokens_per_block and head_dim (hence data_words)."""
    if not is_pow2(fmt.tokens_per_block) or not is_pow2(fmt.head_dim):
        raise ValueError(
            f"pallas_triton kernels need power-of-2 tokens_per_block and head_dim, got "
            f"{fmt.tokens_per_block} and {fmt.head_dim}; use impl='reference'")


def check_query_geometry(q_shape, fmt: KVFormat, blocks_per_step, interpret: bool):
    """Shared checks of the decode and prefill kernels. q_shape `[rows, Hq, D]`.

    Returns (group = Hq // kv_heads, blocks_per_step with its default: 64 tokens per inner
    tile on GPU, one block when interpreted).
    """
    check_triton_format(fmt)
    _, hq, d = q_shape
    if d != fmt.head_dim or hq % fmt.num_kv_heads:
        raise ValueError(f"q {tuple(q_shape)} does not match {fmt.describe()}")
    if blocks_per_step is None:
        blocks_per_step = 1 if interpret else max(1, 64 // fmt.tokens_per_block)
    if not is_pow2(blocks_per_step):
        raise ValueError(f"blocks_per_step must be a power of 2, got {blocks_per_step}")
    return hq // fmt.num_kv_heads, blocks_per_step


def compute_dtype(q_dtype) -> jnp.dtype:
    """Dot operand dtype: bf16/f16 queries use tensor-core dots with f32 accumulation
    (the dequantized KV is rounded to that dtype, as in every flash-attention kernel);
    anything else computes in float32 (exact-ish; slow on GPU, used by the tests)."""
    q_dtype = jnp.dtype(q_dtype)
    return q_dtype if q_dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else \
        jnp.dtype(jnp.float32)


def matmul(a: jax.Array, b: jax.Array, *, trans_b: bool, cdt) -> jax.Array:
    """`a @ b` (or `a @ b.T`) -> float32. a: `[m, k]`; b: `[k, n]` or `[n, k]` if trans_b."""
    m, k = a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    if min(m, k, n) >= _MIN_DOT_DIM:
        precision = lax.Precision.HIGHEST if cdt == jnp.float32 else None
        return dot(a.astype(cdt), b.astype(cdt), trans_b=trans_b, precision=precision)
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    if trans_b:
        return jnp.sum(a[:, None, :] * b[None, :, :], axis=2)
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


def planes_scores(q_planes: Sequence[jax.Array], k_planes: Sequence[jax.Array], cdt,
                  sm_scale: float) -> jax.Array:
    """Scores `[m, n]` = scale * sum_k q_k `[m, dw]` . k_k `[n, dw]`^T (float32)."""
    s = matmul(q_planes[0], k_planes[0], trans_b=True, cdt=cdt)
    for qk, kk in zip(q_planes[1:], k_planes[1:]):
        s = s + matmul(qk, kk, trans_b=True, cdt=cdt)
    return s * sm_scale


def online_softmax_step(m: jax.Array, l: jax.Array, acc: Sequence[jax.Array],
                        scores: jax.Array, mask: jax.Array, v_planes: Sequence[jax.Array],
                        cdt) -> Tuple[jax.Array, jax.Array, Tuple[jax.Array, ...]]:
    """One KV tile of the online softmax.

    Args:
      m, l: float32 `[m]` running max and sum; acc: planes float32 `[m, dw]` (unnormalized).
      scores: float32 `[m, n]`; mask: bool `[m, n]` (or broadcastable): entries to keep.
      v_planes: float32 `[n, dw]` planes of V (rows of masked tokens must be finite:
        `load_kv_tile` returns zeros for them).
    Returns: updated (m, l, acc).
    """
    scores = jnp.where(mask, scores, MASK)
    m_new = jnp.maximum(m, jnp.max(scores, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(scores - m_new[:, None]), 0.0)
    l_new = l * corr + jnp.sum(p, axis=1)
    acc_new = tuple(a * corr[:, None] + matmul(p, v, trans_b=False, cdt=cdt)
                    for a, v in zip(acc, v_planes))
    return m_new, l_new, acc_new

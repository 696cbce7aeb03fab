"""Hadamard rotation of K/V head vectors for KV formats that store them rotated (int4).

A 4-bit KV row has one scale and zero per head row, so a row with a few large channels (keys
have them: RoPE pairs of high norm) spends its 16 levels on the outliers and rounds the rest
coarsely. An orthonormal Hadamard transform H spreads every channel over all channels, so the
rotated row is flat and quantizes with a fraction of the error (QuaRot, Ashkboos et al.,
arXiv 2404.00456). Attention is unchanged in real arithmetic, because H is orthonormal and
symmetric (H = H^T = H^-1):

    softmax((q H)(k H)^T) (v H) H == softmax(q k^T) v

so the attention backend rotates q, k and v of every token before it writes and attends,
and rotates its output back; the model, the kernels and the arena never know. Measured on
SmolLM2-135M with the qoq preset (WORKSPACE_NOTES.md, 2026-12-02 fourth session): held-out
perplexity ratio to the float model 1.350 -> 1.28 with the int4 KV cache rotated.

The transform is the fast Walsh-Hadamard transform (log2(b) add/subtract stages), not a
matmul: elementwise arithmetic of one row only, so a row's result does not depend on how
many rows share the step by construction (a GEMM's summation order may follow the batch
shape; see the batch-invariance tests). A constant [D, D] matmul compiles faster still (the
serve job's cold start: 34.3 s vs 36.4 s with this form, 38.1 s with slice-and-stack stages)
and was row-invariant when measured on CPU, but nothing guarantees that on every backend.
head_dim that is not a power of two is rotated in blocks of its largest power-of-two divisor
(block-diagonal H, still orthonormal and symmetric).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# KV dtypes whose cache stores rotated rows. int8/fp8 rows keep 256 levels and meet their
# quality bounds without it; rotating them would only change their rounding.
ROTATED_KV_DTYPES = ("int4",)


def rotates_kv(kv_dtype: str) -> bool:
    """Whether a KV cache of `kv_dtype` stores Hadamard-rotated K/V rows."""
    return kv_dtype in ROTATED_KV_DTYPES


def hadamard_block(head_dim: int) -> int:
    """The size b of the Hadamard blocks of a head_dim row: its largest power-of-two divisor."""
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    return head_dim & -head_dim


def hadamard_rows(x: jax.Array) -> jax.Array:
    """x [..., head_dim] -> x H (same shape and dtype), H the normalized Sylvester Hadamard
    matrix of size `hadamard_block(head_dim)`, block-diagonal over head_dim. Self-inverse.
    Computed in float32."""
    d = x.shape[-1]
    b = hadamard_block(d)
    lead = x.shape[:-1]
    y = x.astype(jnp.float32)
    h = 1
    while h < b:
        # Butterfly stage on pairs (j, j + h) inside every 2h channels: lo' = lo + hi,
        # hi' = lo - hi, written as partner + sign * self (a swap, one multiply-add) because
        # XLA compiles that several times faster than slicing and stacking the halves (the
        # serve job's cold start, WORKSPACE_NOTES.md). Each stage is exact (sign is +-1), yet
        # the compiled model's qoq perplexity moved by 0.2% against that form (cause not traced).
        sign = np.tile(np.repeat(np.array([1.0, -1.0], np.float32), h), d // (2 * h))
        partner = jnp.flip(y.reshape(*lead, d // (2 * h), 2, h), axis=-2).reshape(*lead, d)
        y = partner + y * sign
        h *= 2
    return (y * (1.0 / math.sqrt(b))).astype(x.dtype)

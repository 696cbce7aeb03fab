"""GPTQ rounding: quantize a kernel row by row, each row's rounding error compensated by the
rows not yet quantized, weighted by the second moment of the layer's inputs.

Round-to-nearest minimizes each weight's own error; GPTQ (Frantar et al., 2022) minimizes the
layer's output error `||X W - X Q||^2` over calibration inputs X, with the inverse Hessian
`(X^T X)^-1` telling how the error of input row i is best absorbed by rows j > i. Here the
kernel is `[in, out]` (the project's layout), so GPTQ's "columns" are our input rows.
Blocked as in the paper (lazy updates: a block of rows is quantized with updates inside the
block, then one GEMM carries the block's errors to every later row). Traceable (runs under
`jax.jit(jax.vmap(...))` in `stack_modules`).

Measured on SmolLM2-135M (float32, held-out perplexity ratio to the float model; fp8 e4m3
weights with a per-output-channel scale): round-to-nearest 1.046, GPTQ 1.018 (2026-12-02,
WORKSPACE_NOTES.md). With int4 groups it made the ratio worse (1.25 -> 1.37-1.41 with 13
calibration sequences), so only the fp8 weight format uses it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["gptq_round", "DAMP", "BLOCK"]

DAMP = 0.01  # added to the Hessian's diagonal, relative to its mean (the paper's default)
BLOCK = 128  # rows quantized between two lazy updates


def _upper_inverse_cholesky(h: jax.Array) -> jax.Array:
    """U upper triangular with `h^-1 = U^T U`, h symmetric positive definite [n, n]."""
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    hinv = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(h, lower=True), eye)
    return jnp.linalg.cholesky(hinv).T


def gptq_round(w: jax.Array, hessian: jax.Array,
               round_rows: Callable[[jax.Array], jax.Array],
               damp: float = DAMP, block: int = BLOCK) -> jax.Array:
    """Quantize w by GPTQ.

    Args:
      w: float32 `[in, out]` kernel (as the layer quantizes it: scales and clipping applied).
      hessian: float32 `[in, in]`: `X^T X` of the layer's inputs X `[N, in]` (in the same
        coordinates as w's rows; any positive multiple gives the same result).
      round_rows: `[k, out]` -> `[k, out]`: the format's round-to-nearest, dequantized, on
        a grid fixed beforehand (so the result is exactly representable).
    Returns: float32 `[in, out]`, every row on the grid (what `round_rows` returns).
    Inputs rows that never fire (zero diagonal) are quantized as zeros.
    """
    n = w.shape[0]
    w = w.astype(jnp.float32)
    h = hessian.astype(jnp.float32)
    diag = jnp.diagonal(h)
    dead = diag <= 0
    w = jnp.where(dead[:, None], 0.0, w)
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(n, dtype=jnp.float32)
    u = _upper_inverse_cholesky(h)
    out = []
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        u1 = u[i1:i2, i1:i2]

        def body(i, carry, u1=u1):
            w1, q1, e1 = carry
            row = lax.dynamic_index_in_dim(w1, i, keepdims=False)
            q = round_rows(row[None])[0]
            err = (row - q) / u1[i, i]
            # u1 is upper triangular: rows j < i get nothing; row i itself becomes q.
            w1 = w1 - u1[i][:, None] * err[None, :]
            return w1, q1.at[i].set(q), e1.at[i].set(err)

        w1 = w[i1:i2]
        _, q1, e1 = lax.fori_loop(0, i2 - i1, body, (w1, jnp.zeros_like(w1), jnp.zeros_like(w1)))
        out.append(q1)
        if i2 < n:
            w = w.at[i2:].add(-jnp.einsum("bi,bo->io", u[i1:i2, i2:], e1,
                                          precision=lax.Precision.HIGHEST))
    return jnp.concatenate(out, axis=0)

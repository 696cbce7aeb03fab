"""Quantized linear layers: the same call as `models.linear.Linear`, other containers.

Every layer maps `y[..., out] = layer(x[..., in])` with `y` in x's dtype, so
`models/transformer.py` runs unchanged for every precision preset; only the stored
weights and the matmul differ. Layers are built from a float kernel by round-to-nearest
(RTN) quantization; `fineserve_jax.quant.quantize_model` swaps them into a model.

Formats (kernel [in, out]; G = in / group groups along the input dim):

  layer        preset       stored nnx.Params                                   matmul
  Fp8Linear    fp8 W8A8     weight fp8e4m3 [in, out], weight_scale f32 [out]     fp8 x fp8 -> f32
  Int8Linear   int8 W8A16   weight int8 [in, out], weight_scale f32 [G, out]     dequant -> x dtype
  Int4Linear   awq W4A16    weight uint8 [in/2, out] (2 nibbles/byte),           dequant -> x dtype
                            weight_scale f32 [G, out], weight_zero uint8 [G, out]
  W4A8Linear   qoq W4A8     weight uint8 [in/2, out], weight_scale f32 [out],    int8 x int8 -> int32
                            group_scale uint8 [G, out], weight_zero uint8 [G, out]

plus, on every layer, `bias` [out] in the model dtype (when the float layer has one) and,
for AWQ-calibrated layers whose scale could not be folded into the model, `act_scale` f32
[in]: the weights were quantized as `W' = W * act_scale[:, None]` and the layer divides its
input by `act_scale` at runtime, so `(x / s) @ Q(W * s) ~= x @ W` with the salient input
channels quantized more finely. Folded AWQ scales (`in_scale`/`out_scale` at construction,
see `fineserve_jax.quant.awq`) shape the quantized weights but are not stored.
Non-trainable metadata (`in_features`, `out_features`, `group_size`) are plain attributes.

Activation quantization (W8A8, W4A8) is dynamic and per token (one float32 scale per row
of x, `scale = max|x_row| / qmax`), so an outlier token cannot spoil its neighbours.

Batch invariance: a row of y depends on that row of x only, bit for bit, whatever the other
rows of the call (other requests, padding) are and however many there are. Scales are per
row, and GEMMs that accumulate in float run in row blocks of one fixed shape
(`row_blocked_matmul`), because XLA's float summation order depends on the GEMM's row
count; the W4A8 GEMM accumulates in int32, which is exact in any order.

Arithmetic conventions (the tests re-implement them in float64 numpy):
  symmetric  q = clip(round(v * (1 / scale)), -qmax, qmax),
             scale = max(amax * f32(1/qmax), SCALE_FLOOR)
             (fp8: q = cast_e4m3(clip(v * (1 / scale), -448, 448)); a plain cast of an
             out-of-range value gives NaN, not saturation, hence the clip)
  int4       asymmetric with an integer zero point: v ~= (q - zero) * scale, q and zero in
             [0, 15], scale = (max - min) * f32(1/15), zero = round(-min * (1 / scale));
             the range [min, max] of a group is widened to include 0 so that the zero
             point is representable.
  Divisions by scales are multiplies by the float32 reciprocal (see `_inv`); the AWQ
  division of x by act_scale too.
  W4A8       QoQ's progressive group quantization (QServe, arXiv 2405.04532): W is first
             quantized per output channel to int8 in the protective range [-119, 119]
             (f32 `weight_scale`), then each group of those int8 values to uint4 with an
             integer (uint8) `group_scale` and zero. `(q - zero) * group_scale` is then an
             exact int8 (|.| <= 119 + 16/2 = 127, no overflow), so the matmul is
             int8 activations x int8 weights with int32 accumulation, scaled once per
             output channel and token afterwards.

Backends: XLA CPU has no fp8 GEMM: `dot_general` on fp8 operands is lowered to converts to
f32 and an f32 dot (the products of two e4m3 values are exact in f32, so the result equals
an fp8 GEMM with f32 accumulation). int8 x int8 -> int32 runs natively on XLA CPU. On
Hopper GPUs XLA's GEMM rewriter maps the fp8 dot (with the scaling multiplies) to cuBLASLt
fp8 GEMMs and the int8 dot to IMMA where the shapes allow; otherwise it upcasts, with the
same results up to accumulation order. Inside the engine's layer scan on CPU (impl "cpu"), the
layers multiply by their layer of the stacked weights in place through a C++ kernel that
dequantizes on the fly (`_in_place`, `pallas_kernels/cpu/matmul.py`): the same products,
float sums in another fixed order per row, W4A8's int32 sums exact.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fineserve_jax.formats import FP8_E4M3_MAX, INT4_LEVELS, INT8_QMAX
from fineserve_jax.formats.int4_pack import pack_int4, unpack_int4
from models.gptq import gptq_round
from models.linear import StackedKernel

# Scales never go below this, so an all-zero row/group quantizes to zeros instead of 0/0.
SCALE_FLOOR = 1e-12
# QoQ level-1 range: leaves room for the level-2 rounding (|q8| <= 119 + 16/2 = 127).
QOQ_PROTECTIVE_QMAX = 119.0

_QMAX = {"fp8": FP8_E4M3_MAX, "int8": INT8_QMAX}


def effective_group_size(in_features: int, group_size: int) -> int:
    """Group length along the input dim: the largest divisor of `in_features` <= group_size.

    Groups must tile the input dim exactly. When `in_features < group_size` this is
    `in_features` (one group per output channel); when `group_size` does not divide it,
    the next smaller divisor (e.g. in=200, group 128 -> 100), i.e. finer groups, never
    coarser ones. Llama/Mistral/Qwen widths are multiples of 128, so 128 is used as is.
    """
    if in_features <= 0 or group_size <= 0:
        raise ValueError(f"in_features and group_size must be positive, got "
                         f"{in_features}, {group_size}")
    g = min(group_size, in_features)
    while in_features % g:
        g -= 1
    return g


# --- the quantizers ------------------------------------------------------------------------

def reciprocal(c: float) -> float:
    """1/c rounded to float32, for constant divisors (see `_inv`)."""
    return float(np.float32(1.0) / np.float32(c))


def _inv(scale: jax.Array) -> jax.Array:
    """1 / scale (one IEEE division per scale).

    Every division by a per-row/group scale is written as a multiply by its reciprocal:
    XLA CPU rewrites `v / broadcast(s)` into `v * broadcast(1 / s)` anyway (and other
    backends may not), which rounds differently at exact ties (e.g. 91 / 14 = 6.5). Writing
    the multiply explicitly makes every backend and the numpy reference round identically.
    """
    return 1.0 / scale


def symmetric_scale(v: jax.Array, fmt: str, axis, qmax: Optional[float] = None) -> jax.Array:
    """The scale of symmetric RTN along `axis` (kept with size 1): amax / qmax, floored."""
    qmax = _QMAX[fmt] if qmax is None else qmax
    amax = jnp.max(jnp.abs(v), axis=axis, keepdims=True)
    return jnp.maximum(amax * reciprocal(qmax), SCALE_FLOOR)


def symmetric_codes(v: jax.Array, scale: jax.Array, fmt: str,
                    qmax: Optional[float] = None) -> jax.Array:
    """v / scale rounded into `fmt` (fp8 e4m3fn or int8), saturating at +-qmax."""
    qmax = _QMAX[fmt] if qmax is None else qmax
    y = v * _inv(scale)
    if fmt == "fp8":
        return jnp.clip(y, -qmax, qmax).astype(jnp.float8_e4m3fn)
    return jnp.clip(jnp.round(y), -qmax, qmax).astype(jnp.int8)


def symmetric_quantize(v: jax.Array, fmt: str, axis, qmax: Optional[float] = None):
    """Symmetric RTN along `axis` (reduced, kept with size 1).

    v float32; fmt "fp8" (e4m3fn) or "int8". Returns (q, scale): q fp8/int8 of v's shape,
    scale float32 with `axis` of size 1, such that v ~= q * scale. `qmax` overrides the
    format's largest magnitude (448 for fp8, 127 for int8).
    """
    scale = symmetric_scale(v, fmt, axis, qmax)
    return symmetric_codes(v, scale, fmt, qmax), scale


def asymmetric_quantize(v: jax.Array, axis, integer_scale: bool = False):
    """Asymmetric 4-bit RTN along `axis`: v ~= (q - zero) * scale.

    v float32. Returns (q uint8 in [0, 15] of v's shape, scale float32, zero uint8 in
    [0, 15]), scale/zero with `axis` of size 1. With `integer_scale` the scale is rounded
    up to an integer >= 1 (QoQ level 2, where v holds int8 values), so it is exact in uint8.
    """
    lo = jnp.minimum(jnp.min(v, axis=axis, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(v, axis=axis, keepdims=True), 0.0)
    if integer_scale:  # ceil(span / 15) in exact integer arithmetic
        span = (hi - lo).astype(jnp.int32)
        levels = int(INT4_LEVELS)
        scale = jnp.maximum((span + levels - 1) // levels, 1).astype(jnp.float32)
    else:
        scale = jnp.maximum((hi - lo) * reciprocal(INT4_LEVELS), SCALE_FLOOR)
    inv = _inv(scale)
    zero = jnp.clip(jnp.round(-lo * inv), 0, INT4_LEVELS)
    q = jnp.clip(jnp.round(v * inv) + zero, 0, INT4_LEVELS)
    return q.astype(jnp.uint8), scale, zero.astype(jnp.uint8)


def expand_groups(a: jax.Array, group: int) -> jax.Array:
    """Per-group values [G, out] -> per-row [G * group, out] (row r belongs to group r // group)."""
    return jnp.repeat(a, group, axis=0)


def _matmul(x: jax.Array, w: jax.Array, acc_dtype) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out] accumulated in `acc_dtype` (one GEMM)."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=acc_dtype)


# Rows per GEMM of `row_blocked_matmul`, per backend. CPU: 16 (a small block keeps the
# padding of a batch-1 decode cheap; one block covers a typical decode batch). Its cost
# through the engine (SmolLM2-135M, int8 preset, float32, 2-core CPU): a whole decode step
# takes 1.4x as long as with one plain GEMM per projection at batch 1 (100 vs 71 ms) and as
# long at batch 32 (191 vs 201 ms, within noise); WORKSPACE_NOTES.md. Other
# backends: 256 rows, not measured (a GPU GEMM of 256 rows is already compute-efficient;
# decode batches fit in one block).
ROW_BLOCK = {"cpu": 16}
DEFAULT_ROW_BLOCK = 256


def row_block() -> int:
    """Rows per GEMM block on the default backend (see `ROW_BLOCK`)."""
    return ROW_BLOCK.get(jax.default_backend(), DEFAULT_ROW_BLOCK)


def row_blocked_matmul(x: jax.Array, w: jax.Array, acc_dtype,
                       block: Optional[int] = None) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out] in `acc_dtype`, `block` rows per GEMM.

    Batch invariance: XLA picks a GEMM algorithm, and with it the order of the float sums,
    from the operand shapes. On XLA CPU a row of x [M, 576] @ w [576, 1536] rounds one way
    when M = 1, another for M in 2..32 and a third for M >= 33 (measured), so a token's
    output depended on how many tokens shared its step; a later rounding step (fp8/int8
    activations, the KV cache) turns those last-bit differences into different tokens.
    Here every row goes through a GEMM of one fixed shape [block, in] x [in, out] (rows
    padded with zeros, `lax.map` over the blocks): a row's result depends on that row only,
    not on the number of rows, its position, or what the other rows (padding included)
    hold. block None: `row_block()`.
    """
    block = row_block() if block is None else int(block)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    lead, k = x.shape[:-1], x.shape[-1]
    m = math.prod(lead)
    padded = -(-m // block) * block
    blocks = jnp.pad(x.reshape(m, k), ((0, padded - m), (0, 0))).reshape(-1, block, k)
    y = jax.lax.map(lambda b: _matmul(b, w, acc_dtype), blocks)
    return y.reshape(padded, w.shape[1])[:m].reshape(*lead, w.shape[1])


# --- the layers ----------------------------------------------------------------------------

class QuantLinear(nnx.Module):
    """Base of the quantized layers: input scaling, bias and the output dtype.

    Subclasses set `weight_format` / `activation_format`, `kernel_format` and
    `kernel_operands` (the format and arrays of an in-place kernel: `_in_place`), and
    implement `_store(w, grid)`
    (quantize the float32 kernel [in, out] into Params) and `_product(x)`
    (x float32 [..., in] after the AWQ division, compute dtype -> float32 [..., out]); formats
    GPTQ can round also implement `_grid(w)` and `_round_rows(rows, grid)`.
    """

    weight_format = "?"
    activation_format = "?"
    kernel_format = "?"  # the in-place GEMM's format (`LayerKernels.quant_matmul`)
    kernel_operands: dict = {}  # its argument -> this layer's stacked attribute read

    def __init__(self, kernel: jax.Array, bias: Optional[jax.Array] = None, *,
                 group_size: int = 128, act_scale: Optional[jax.Array] = None,
                 in_scale: Optional[jax.Array] = None, out_scale: Optional[jax.Array] = None,
                 clip: Optional[jax.Array] = None, hessian: Optional[jax.Array] = None):
        """kernel [in, out] float (any float dtype) -> quantized by RTN.

        bias [out] is stored as given (the model dtype). AWQ scales, all float:
          act_scale [in]  stored: the kernel is quantized as `kernel * act_scale[:, None]`
                          and inputs are divided by act_scale at runtime.
          in_scale [in]   folded: the kernel is quantized as `kernel * in_scale[:, None]`;
                          whatever produces x has already divided it by in_scale (an
                          RMSNorm weight, the output columns of the previous projection).
                          Nothing is stored.
          out_scale [out] folded: kernel columns and bias are divided by out_scale (the
                          layer's output comes out divided; its consumer's kernel rows
                          carry in_scale = out_scale). Nothing is stored.
        clip [G, out] in (0, 1] (AWQ's clipping search, grouped formats only): each input
        group's weights of an output channel are clipped to `ratio * [min, max]` of that
        group (after the scales) before RTN, trading the outliers' error for finer steps.
        """
        self.in_features, self.out_features = (int(d) for d in kernel.shape)
        w = jnp.asarray(kernel).astype(jnp.float32)
        x_div = jnp.ones((self.in_features,), jnp.float32)  # runtime input = float input / x_div

        def scale(v, n, name):
            v = jnp.asarray(v).astype(jnp.float32)
            if v.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {v.shape}")
            return v

        if act_scale is not None:
            s = scale(act_scale, self.in_features, "act_scale")
            self.act_scale = nnx.Param(s)
            w = w * s[:, None]
            x_div = x_div * s
        else:
            self.act_scale = None
        if in_scale is not None:
            s = scale(in_scale, self.in_features, "in_scale")
            w = w * s[:, None]
            x_div = x_div * s
        if out_scale is not None:
            inv_out = _inv(scale(out_scale, self.out_features, "out_scale"))
            w = w * inv_out[None, :]
            if bias is not None:
                bias = (jnp.asarray(bias).astype(jnp.float32) * inv_out).astype(
                    jnp.asarray(bias).dtype)
        self._configure(group_size)
        if clip is not None:
            w = self._clip(w, jnp.asarray(clip, jnp.float32))
        grid = self._grid(w)
        if hessian is not None:
            h = jnp.asarray(hessian, jnp.float32)
            if h.shape != (self.in_features, self.in_features):
                raise ValueError(f"hessian must have shape {(self.in_features,) * 2}, got {h.shape}")
            if grid is None:
                raise ValueError(f"{type(self).__name__} has no GPTQ rounding (fp8 weights only)")
            inv = _inv(x_div)
            w = gptq_round(w, h * inv[:, None] * inv[None, :],
                           lambda rows: self._round_rows(rows, grid))
        self._store(w, grid)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))

    @classmethod
    def from_linear(cls, linear, *, group_size: int = 128,
                    act_scale: Optional[jax.Array] = None) -> "QuantLinear":
        """Quantize a `models.linear.Linear` (kernel [in, out], optional bias)."""
        bias = None if linear.bias is None else linear.bias[...]
        return cls(linear.kernel[...], bias, group_size=group_size, act_scale=act_scale)

    def _configure(self, group_size: int) -> None:
        """Hook for formats with groups (sets `self.group_size`)."""

    def _clip(self, w: jax.Array, ratio: jax.Array) -> jax.Array:
        raise ValueError(f"{type(self).__name__} has no weight groups to clip")

    def _grid(self, w: jax.Array):
        """The quantization grid `_store` uses for w (formats GPTQ can round); None else."""
        return None

    def _round_rows(self, rows: jax.Array, grid) -> jax.Array:
        """RTN of kernel rows [k, out] on `grid`, dequantized float32 (for GPTQ)."""
        raise NotImplementedError

    def _store(self, w: jax.Array, grid) -> None:
        """Quantize w [in, out] into Params; grid: `_grid` of the kernel before any GPTQ
        rounding (None for formats without one), so a GPTQ result keeps RTN's scales."""
        raise NotImplementedError

    def _product(self, x: jax.Array, compute_dtype) -> jax.Array:
        raise NotImplementedError

    def dequantized_weight(self) -> jax.Array:
        """The kernel the layer effectively applies to `x / act_scale`: float32 [in, out]."""
        raise NotImplementedError

    def _in_place(self, x: jax.Array) -> Optional[jax.Array]:
        """x float32 [..., in] times the stored weights by the backend's in-place kernel when
        the decoder's layer scan passes one (`weight` holds a `StackedKernel`); else None.
        Float formats: float32 [..., out], the same products as the XLA path, summed in
        another fixed order (still one sum per row: batch-invariant); w4a8: the exact int32."""
        w = self.weight.get_value()
        return w.product(x) if isinstance(w, StackedKernel) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.act_scale is not None:
            x32 = x32 * _inv(self.act_scale[...])
        y = self._product(x32, x.dtype).astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class _GroupedMixin:
    """Groups of `group_size` consecutive input rows share a scale (and zero)."""

    def _configure(self, group_size: int) -> None:
        self.group_size = effective_group_size(self.in_features, group_size)

    def _groups(self, w: jax.Array) -> jax.Array:
        """[in, out] -> [G, group, out]."""
        return w.reshape(self.in_features // self.group_size, self.group_size, self.out_features)

    def _clip(self, w: jax.Array, ratio: jax.Array) -> jax.Array:
        """w [in, out] with each (group, output channel) clipped to ratio [G, out] times its
        [min, max]."""
        g = self._groups(w)
        if ratio.shape != (g.shape[0], self.out_features):
            raise ValueError(f"clip must have shape {(g.shape[0], self.out_features)}, got "
                             f"{ratio.shape}")
        lo = jnp.min(g, axis=1, keepdims=True) * ratio[:, None]
        hi = jnp.max(g, axis=1, keepdims=True) * ratio[:, None]
        return jnp.clip(g, lo, hi).reshape(w.shape)


class Fp8Linear(QuantLinear):
    """W8A8 fp8 (e4m3fn): per-output-channel weight scales, per-token activation scales."""

    weight_format = "fp8"
    activation_format = "fp8"
    kernel_format = "fp8"

    def _grid(self, w):
        return symmetric_scale(w, "fp8", axis=0)  # [1, out]

    def _round_rows(self, rows, grid):
        return symmetric_codes(rows, grid, "fp8").astype(jnp.float32) * grid

    def _store(self, w, grid):
        self.weight = nnx.Param(symmetric_codes(w, grid, "fp8"))
        self.weight_scale = nnx.Param(grid[0])

    def _product(self, x, compute_dtype):
        xq, x_scale = symmetric_quantize(x, "fp8", axis=-1)
        acc = self._in_place(xq.astype(jnp.float32))  # fp8 values are exact in float32
        if acc is None:
            acc = row_blocked_matmul(xq, self.weight[...], jnp.float32)
        return acc * x_scale * self.weight_scale[...]

    def dequantized_weight(self):
        return self.weight[...].astype(jnp.float32) * self.weight_scale[...]


class _WeightOnlyLinear(_GroupedMixin, QuantLinear):
    """Grouped integer weights with activations in the model dtype (W8A16, W4A16): the
    subclass dequantizes (`dequantized_weight`), the product is one float GEMM."""

    def _product(self, x, compute_dtype):
        # The in-place kernel reads float32 activations only (bf16 takes the slice).
        acc = self._in_place(x) if compute_dtype == jnp.float32 else None
        if acc is not None:
            return acc
        # Dequantize, then one GEMM in the activation dtype with f32 accumulation: the
        # [in, out] dequantized kernel fuses into the dot's operand on GPU; a grouped
        # einsum would materialize [tokens, G, out] partial sums instead.
        w = self.dequantized_weight().astype(compute_dtype)
        return row_blocked_matmul(x.astype(compute_dtype), w, jnp.float32)


class Int8Linear(_WeightOnlyLinear):
    """W8A16: symmetric int8 weights with a float32 scale per (input group, output channel)."""

    weight_format = "int8"
    activation_format = "bf16"
    kernel_format = "int8"
    kernel_operands = {"scale": "weight_scale"}

    def _store(self, w, grid):
        q, scale = symmetric_quantize(self._groups(w), "int8", axis=1)
        self.weight = nnx.Param(q.reshape(self.in_features, self.out_features))
        self.weight_scale = nnx.Param(scale[:, 0])

    def dequantized_weight(self):
        return (self.weight[...].astype(jnp.float32)
                * expand_groups(self.weight_scale[...], self.group_size))


class Int4Linear(_WeightOnlyLinear):
    """W4A16 (AWQ format): uint4 weights, packed 2 per byte along the input dim, with a
    float32 scale and a uint8 zero point per (input group, output channel)."""

    weight_format = "int4"
    activation_format = "bf16"
    kernel_format = "int4"
    kernel_operands = {"scale": "weight_scale", "zero": "weight_zero"}

    def _store(self, w, grid):
        q, scale, zero = asymmetric_quantize(self._groups(w), axis=1)
        self.weight = nnx.Param(pack_int4(q.reshape(self.in_features, self.out_features), 0))
        self.weight_scale = nnx.Param(scale[:, 0])
        self.weight_zero = nnx.Param(zero[:, 0])

    def dequantized_weight(self):
        q = unpack_int4(self.weight[...], 0).astype(jnp.float32)
        zero = expand_groups(self.weight_zero[...], self.group_size).astype(jnp.float32)
        return (q - zero) * expand_groups(self.weight_scale[...], self.group_size)

class W4A8Linear(_GroupedMixin, QuantLinear):
    """W4A8 (QoQ): uint4 weights with integer group scales/zeros over a per-channel int8
    level, int8 per-token activations, int8 x int8 -> int32 GEMM."""

    weight_format = "int4"
    activation_format = "int8"
    kernel_format = "w4a8"
    kernel_operands = {"zero": "weight_zero", "group_scale": "group_scale"}

    def _store(self, w, grid):
        w8, scale = symmetric_quantize(w, "int8", axis=0, qmax=QOQ_PROTECTIVE_QMAX)
        q, gscale, zero = asymmetric_quantize(
            self._groups(w8.astype(jnp.float32)), axis=1, integer_scale=True)
        self.weight = nnx.Param(pack_int4(q.reshape(self.in_features, self.out_features), 0))
        self.weight_scale = nnx.Param(scale[0])
        self.group_scale = nnx.Param(gscale[:, 0].astype(jnp.uint8))
        self.weight_zero = nnx.Param(zero[:, 0])

    def int8_weight(self) -> jax.Array:
        """Level-2 dequantization, integer only: (q - zero) * group_scale, int8 [in, out]."""
        q = unpack_int4(self.weight[...], 0).astype(jnp.int32)
        zero = expand_groups(self.weight_zero[...], self.group_size).astype(jnp.int32)
        gscale = expand_groups(self.group_scale[...], self.group_size).astype(jnp.int32)
        return ((q - zero) * gscale).astype(jnp.int8)

    def dequantized_weight(self):
        return self.int8_weight().astype(jnp.float32) * self.weight_scale[...]

    def _product(self, x, compute_dtype):
        xq, x_scale = symmetric_quantize(x, "int8", axis=-1)
        # int32 accumulation is exact, so any summation order gives the same sums: one
        # GEMM over all rows is already batch-invariant (no row blocks needed).
        acc = self._in_place(xq.astype(jnp.float32))
        if acc is None:
            acc = _matmul(xq, self.int8_weight(), jnp.int32)
        return acc.astype(jnp.float32) * x_scale * self.weight_scale[...]


def layer_class(weights: str, activations: str) -> Optional[type]:
    """The quantized layer for a (weights, activations) pair; None for bf16 weights."""
    table = {
        ("fp8", "fp8"): Fp8Linear,
        ("int8", "bf16"): Int8Linear,
        ("int4", "bf16"): Int4Linear,
        ("int4", "int8"): W4A8Linear,
    }
    if weights == "bf16":
        if activations != "bf16":
            raise ValueError(f"bf16 weights with {activations} activations are not supported")
        return None
    try:
        return table[(weights, activations)]
    except KeyError:
        valid = ", ".join(f"W={w}/A={a}" for w, a in table)
        raise ValueError(f"no quantized layer for weights={weights!r}, activations="
                         f"{activations!r}; supported: {valid} (and bf16/bf16)") from None

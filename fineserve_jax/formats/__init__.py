"""Formats: the leaf every other layer imports downward.

  kv_format.py   KV dtypes and `KVFormat`, the byte layout of one KV block (pure Python)
  kv_layout.py   word offsets inside a block (ints or jnp arrays)
  kv_codec.py    quantize/dequantize KV rows to/from the block's packed words (jnp)
  kv_rotation.py the Hadamard rotation int4 KV rows are stored in (jnp)
  kv_split.py    how a model's KV heads spread over a tensor-parallel group (pure Python)
  int4_pack.py   two uint4 weight codes per byte (jnp)
  precision.py   precision presets (`org`, `fp8`, `fp8_kv8`, `awq`, `qoq`, `int8`, `int8_kv8`)

Importing this package imports no JAX; `kv_codec`, `kv_rotation` and `int4_pack` do (import
them explicitly).
"""

from fineserve_jax.formats.kv_format import (
    FP8_E4M3_MAX,
    INT4_LEVELS,
    INT8_QMAX,
    KV_BITS,
    KV_DTYPES,
    KV_SCALE_WORDS,
    WORD_BYTES,
    KVFormat,
    check_kv_dtype,
)
from fineserve_jax.formats.precision import (
    ACTIVATION_FORMATS,
    PRESETS,
    WEIGHT_FORMATS,
    Preset,
    get_preset,
)

__all__ = ["FP8_E4M3_MAX", "INT4_LEVELS", "INT8_QMAX", "KV_BITS", "KV_DTYPES", "KV_SCALE_WORDS",
           "WORD_BYTES", "KVFormat", "check_kv_dtype", "ACTIVATION_FORMATS", "PRESETS",
           "WEIGHT_FORMATS", "Preset", "get_preset"]

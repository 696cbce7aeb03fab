"""Quantization: weight PTQ (fp8, int8, int4 group-wise, AWQ-style scales) and KV rows.

  ptq.py        quantize_model, quantized_structure, restore_quantized, param_bytes
  awq.py        activation-aware per-input-channel scale search (calibration)
  int4_pack.py  two uint4 per byte
  quality.py    logit error metrics of a quantized model against its float original
  kv.py         KV row quantization (the KV block format)

The quantized layers themselves live in `models/quant_linear.py`. Attributes load lazily
(PEP 562): `models.quant_linear` imports `fineserve_jax.quant.int4_pack`, and `ptq` imports
`models.quant_linear`, so an eager import here would be circular.
"""

import importlib

_LAZY = {
    "quantize_model": "fineserve_jax.quant.ptq",
    "quantized_structure": "fineserve_jax.quant.ptq",
    "restore_quantized": "fineserve_jax.quant.ptq",
    "param_bytes": "fineserve_jax.quant.ptq",
    "projection_layers": "fineserve_jax.quant.ptq",
    "search_act_scales": "fineserve_jax.quant.awq",
    "default_calibration": "fineserve_jax.quant.awq",
    "logit_metrics": "fineserve_jax.quant.quality",
    "pack_int4": "fineserve_jax.quant.int4_pack",
    "unpack_int4": "fineserve_jax.quant.int4_pack",
    "quantize_kv_rows": "fineserve_jax.quant.kv",
    "dequantize_kv_rows": "fineserve_jax.quant.kv",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fineserve_jax.quant' has no attribute {name!r}")

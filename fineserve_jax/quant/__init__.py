"""Quantization: weight PTQ (fp8, int8, int4 group-wise, AWQ-style scales).

  ptq.py        quantize_model, quantized_structure, restore_quantized, param_bytes
  awq.py        activation-aware per-input-channel scale search and where scales fold
  calibration.py  the shipped natural texts (calibration, held-out) and `calibration=` ids
  quality.py    logit error metrics of a quantized model against its float original
  projections.py  the projection sites of a decoder (what PTQ swaps and AWQ calibrates)

The quantized layers themselves live in `models/quant_linear.py`; KV quantization is part of
the KV block format (`fineserve_jax.formats.kv_codec`). Attributes load lazily (PEP 562), so
`import fineserve_jax.quant` stays cheap.
"""

import importlib

_LAZY = {
    "quantize_model": "fineserve_jax.quant.ptq",
    "quantized_structure": "fineserve_jax.quant.ptq",
    "restore_quantized": "fineserve_jax.quant.ptq",
    "param_bytes": "fineserve_jax.quant.ptq",
    "projection_layers": "fineserve_jax.quant.projections",
    "search_act_scales": "fineserve_jax.quant.awq",
    "calibration_ids": "fineserve_jax.quant.calibration",
    "logit_metrics": "fineserve_jax.quant.quality",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fineserve_jax.quant' has no attribute {name!r}")

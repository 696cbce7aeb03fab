"""fineserve_jax: serve several LLMs of different precisions on shared GPUs with JAX.

Attributes load lazily so that the host-side subpackages (`kvslab`, `scheduler`,
`workload`, `sim`, `metrics`) import in plain Python without pulling in JAX.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "KVFormat": "fineserve_jax.formats",
    "PRESETS": "fineserve_jax.formats",
    "Preset": "fineserve_jax.formats",
    "get_preset": "fineserve_jax.formats",
    "Model": "fineserve_jax.loader",
    "load_model": "fineserve_jax.loader",
    "LLM": "fineserve_jax.engine.llm",
    "SamplingParams": "fineserve_jax.core.sampling_params",
    "Request": "fineserve_jax.core.request",
    "InvalidRequest": "fineserve_jax.core.field_checks",
    "Engine": "fineserve_jax.engine.device_engine",
    "ModelSpec": "fineserve_jax.engine.device_engine",
    "RequestOutput": "fineserve_jax.engine.device_engine",
}

# `Engine`, `ModelSpec`, `Request`, `SamplingParams`, `LLM`, `load_model` and `metrics` are a
# contract (ARCHITECTURE section 9).
__all__ = sorted([*_LAZY, "metrics"])


_SUBMODULES = ("metrics", "formats", "checkpoint", "tokenizer", "generate", "kvslab", "quant",
               "engine", "scheduler", "workload", "sim")


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"fineserve_jax.{name}")
    raise AttributeError(f"module 'fineserve_jax' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY, *_SUBMODULES})

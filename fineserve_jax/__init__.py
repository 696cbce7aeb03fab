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
    "Engine": "fineserve_jax.engine.device_engine",
}

__all__ = sorted(_LAZY)


_SUBMODULES = ("metrics", "formats", "checkpoint", "tokenizer", "generate", "kvslab", "quant",
               "engine", "scheduler", "workload", "sim")


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"fineserve_jax.{name}")
    raise AttributeError(f"module 'fineserve_jax' has no attribute {name!r}")

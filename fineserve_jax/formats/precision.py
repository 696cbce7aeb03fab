"""Precision presets: (weights, activations, KV) triples named after the FineServe paper.

Pure Python (no JAX).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

WEIGHT_FORMATS = ("bf16", "fp8", "int8", "int4")
ACTIVATION_FORMATS = ("bf16", "fp8", "int8")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A (weights, activations, KV) precision triple, named after the FineServe paper."""

    name: str
    weights: str
    activations: str
    kv: str
    group_size: int = 128  # int8/int4 weight groups along the input dimension
    awq: bool = False  # activation-aware per-channel scaling during PTQ
    gptq: bool = False  # weights rounded by GPTQ on calibration inputs instead of RTN

    @property
    def is_quantized(self) -> bool:
        return (self.weights, self.activations, self.kv) != ("bf16", "bf16", "bf16")


PRESETS: Mapping[str, Preset] = {
    p.name: p
    for p in (
        Preset("org", "bf16", "bf16", "bf16"),
        Preset("fp8", "fp8", "fp8", "bf16", gptq=True),
        Preset("fp8_kv8", "fp8", "fp8", "fp8", gptq=True),
        Preset("awq", "int4", "bf16", "bf16", awq=True),
        Preset("qoq", "int4", "int8", "int4", awq=True),
        Preset("int8", "int8", "bf16", "bf16"),
        Preset("int8_kv8", "int8", "bf16", "int8"),
    )
}


def get_preset(name: "str | Preset") -> Preset:
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown precision preset {name!r}; valid presets: {', '.join(PRESETS)}"
        ) from None

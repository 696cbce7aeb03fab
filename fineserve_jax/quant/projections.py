"""The projection layers of a decoder (the sites that quantization replaces and AWQ calibrates)."""

from __future__ import annotations

from typing import Iterator, Tuple

from flax import nnx

from models.transformer import Transformer

# The projections of a decoder layer, by sub-module (HF names).
PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def projection_layers(module: Transformer) -> Iterator[Tuple[str, nnx.Module, str]]:
    """(path like "layers.0.self_attn.q_proj", parent module, attribute name) per projection."""
    for i, layer in enumerate(module.layers):
        for block_name, names in PROJECTIONS.items():
            block = getattr(layer, block_name)
            for name in names:
                yield f"layers.{i}.{block_name}.{name}", block, name

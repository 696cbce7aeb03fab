"""The projection layers of a decoder (the sites that quantization replaces and AWQ calibrates).

The decoder's layers are stacked (`models/stacking.py`), so each projection *site* (e.g.
`self_attn.q_proj`) is one layer container holding every decoder layer's weights
`[num_layers, ...]`; layer i's projection has the per-layer path `layers.{i}.<site>`.
"""

from __future__ import annotations

from typing import Iterator, Tuple

from flax import nnx

from models.transformer import Transformer

# The projections of a decoder layer, by sub-module (HF names).
PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
SITES = tuple(f"{block}.{name}" for block, names in PROJECTIONS.items() for name in names)


def layer_path(layer: int, site: str) -> str:
    """The per-layer path of a projection: `layers.3.self_attn.q_proj`."""
    return f"layers.{layer}.{site}"


def projection_layers(module) -> Iterator[Tuple[str, nnx.Module, str]]:
    """(site like "self_attn.q_proj", parent module, attribute name) per projection site.

    `module` is a `Transformer` (its stacked layers: the container holds `[num_layers, ...]`
    arrays) or one `DecoderLayer` (e.g. `Transformer.layer(i)`: per-layer arrays).
    """
    layers = module.layers if isinstance(module, Transformer) else module
    for block_name, names in PROJECTIONS.items():
        block = getattr(layers, block_name)
        for name in names:
            yield f"{block_name}.{name}", block, name

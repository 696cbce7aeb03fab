"""GPU memory footprint of a served model: weight bytes per precision preset, and KV bytes
from the real KV block format of its config. Pure Python (no JAX).

Weights (bytes, whole model, summed over a tensor-parallel group):
    linear layers  params x {bf16 2, fp8 1, int8 1, int4 0.5} bytes
                   + group-wise scales of int8/int4 weights: one bf16 scale per `group_size`
                     input channels (int4 AWQ-style also a bf16 zero)
    embedding, LM head (unless tied) and norms stay bf16 (2 bytes per parameter)
Tensor parallelism shards everything evenly (each GPU of a TP group holds 1/tp of the weights
and 1/tp of every KV block: its share of the KV heads), so per-GPU bytes = whole bytes / tp.

KV: `formats.KVFormat(layers, kv_heads, head_dim, preset.kv, tokens_per_block)`, the exact
block layout the slab allocator carves (scales included), so a placement that fits here fits
in the engine's arena.
"""

from __future__ import annotations

import dataclasses
import functools

from fineserve_jax.formats import KVFormat, get_preset

GiB = 1 << 30

# Bytes per linear-layer weight by weight format.
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
# bf16 values stored per quantization group (scale, and a zero point for asymmetric int4).
GROUP_VALUES = {"bf16": 0, "fp8": 0, "int8": 1, "int4": 2}


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Memory of one (model config, precision preset) pair. Bytes are whole-model (all TP
    ranks together)."""

    config: str
    preset: str
    weight_bytes: int
    kv_format: KVFormat
    max_context: int  # the config's longest faithful sequence (tokens)

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_format.block_bytes / self.kv_format.tokens_per_block

    @property
    def block_bytes(self) -> int:
        return self.kv_format.block_bytes

    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes of the whole blocks that hold `num_tokens` tokens of one sequence."""
        return self.kv_format.blocks_for_tokens(num_tokens) * self.kv_format.block_bytes

    def max_len(self, max_model_len: int) -> int:
        """Longest sequence (prompt + output tokens) served: the smaller of the serving limit
        and the model's context."""
        return min(int(max_model_len), self.max_context)

    def min_kv_bytes(self, max_model_len: int) -> int:
        """The least KV memory the model needs: one sequence of maximal length (otherwise such
        a request could never run)."""
        return self.kv_bytes(self.max_len(max_model_len))


def _config(name: str):
    from models.presets import get_model_config  # lazy: keeps this module import light

    return get_model_config(name)


@functools.lru_cache(maxsize=None)
def footprint(config: str, preset: str, tokens_per_block: int = 16) -> Footprint:
    """The footprint of `config` (a `models/presets.py` name) quantized to `preset`."""
    cfg = _config(config)
    p = get_preset(preset)
    linear = cfg.linear_param_count()
    groups = linear / p.group_size if GROUP_VALUES[p.weights] else 0.0
    other = cfg.param_count() - linear  # embedding, LM head, norms
    weights = linear * WEIGHT_BYTES[p.weights] + groups * GROUP_VALUES[p.weights] * 2.0 + other * 2.0
    fmt = KVFormat(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, p.kv, tokens_per_block)
    return Footprint(config, p.name, int(weights), fmt, cfg.max_context)

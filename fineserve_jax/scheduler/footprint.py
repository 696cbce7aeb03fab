"""GPU memory footprint of a served model: weight bytes per precision preset, and KV bytes
from the real KV block format of its config. Pure Python (no JAX).

Weights (bytes, whole model, summed over a tensor-parallel group):
    linear layers  params x {bf16 2, fp8 1, int8 1, int4 0.5} bytes
                   + group-wise scales of int8/int4 weights: one bf16 scale per `group_size`
                     input channels (int4 AWQ-style also a bf16 zero)
    embedding, LM head (unless tied) and norms stay bf16 (2 bytes per parameter)
Tensor parallelism (`tp` GPUs) shards the weights and the KV heads over the group; bytes here
are the group's total, so per-GPU bytes = group bytes / tp. With fewer KV heads than GPUs each
KV head is replicated (`formats.kv_split`, as the engine does): the group then stores
`tp` head rows per token instead of `kv_heads`, and every GPU holds the k/v projection of its
head, so both the KV bytes and the k/v weights count their copies. A tp the heads cannot split
over is an error here, as in the engine.

KV: `formats.KVFormat(layers, stored KV heads, head_dim, preset.kv, tokens_per_block)`, the
exact block layout the slab allocator carves (scales included), so a placement that fits here
fits in the engine's arenas.
"""

from __future__ import annotations

import dataclasses
import functools

from fineserve_jax.formats import KVFormat, get_preset
from fineserve_jax.formats.kv_split import kv_split, tp_fits_heads

GiB = 1 << 30

# Bytes per linear-layer weight by weight format.
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
# bf16 values stored per quantization group (scale, and a zero point for asymmetric int4).
GROUP_VALUES = {"bf16": 0, "fp8": 0, "int8": 1, "int4": 2}


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Memory of one (model config, precision preset) pair on a group of `tp` GPUs. Bytes are
    the group's total (all TP ranks together, replicated KV heads counted on every rank)."""

    config: str
    preset: str
    weight_bytes: int
    kv_format: KVFormat  # the group's KV heads (replicas included) of every block
    max_context: int  # the config's longest faithful sequence (tokens)
    tp: int = 1

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


def tp_fits(config: str, tp: int) -> bool:
    """Whether `config`'s heads split over `tp` GPUs (`formats.kv_split`)."""
    cfg = _config(config)
    return tp_fits_heads(cfg.num_heads, cfg.num_kv_heads, tp)


@functools.lru_cache(maxsize=None)
def footprint(config: str, preset: str, tokens_per_block: int = 16, tp: int = 1) -> Footprint:
    """The footprint of `config` (a `models/presets.py` name) quantized to `preset`, served by
    a group of `tp` GPUs (ValueError when its heads cannot split over them)."""
    cfg = _config(config)
    p = get_preset(preset)
    split = kv_split(cfg.num_heads, cfg.num_kv_heads, tp)
    # k/v projections of a replicated KV head live on every GPU that holds the head
    kv_proj = 2 * cfg.num_layers * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim
    linear = cfg.linear_param_count() + (split.replication - 1) * kv_proj
    groups = linear / p.group_size if GROUP_VALUES[p.weights] else 0.0
    other = cfg.param_count() - cfg.linear_param_count()  # embedding, LM head, norms
    weights = linear * WEIGHT_BYTES[p.weights] + groups * GROUP_VALUES[p.weights] * 2.0 + other * 2.0
    fmt = KVFormat(cfg.num_layers, split.stored_heads, cfg.head_dim, p.kv, tokens_per_block)
    return Footprint(config, p.name, int(weights), fmt, cfg.max_context, tp)

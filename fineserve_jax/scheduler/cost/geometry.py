"""What the cost model scales with: a model's sizes (`Geometry`), a GPU's roofline
(`Hardware`), and the bytes and speed of each precision format.

Each step-time coefficient stands for a physical quantity (per GPU of a tp group):
    a, d  weight bytes / tp      (linear params x `WEIGHT_BYTES` + LM head in bf16)
    b, e  GEMM FLOPs per token / (tp x activation speed)   (2 x linear params; `ACT_SPEED`:
          fp8/int8 activations count as 2x faster than bf16)
    c     attention FLOPs per token pair / tp    (4 x layers x heads x head_dim)
    f     KV bytes per token / tp  (formats.KVFormat.bytes_per_token of the preset's KV dtype;
          replicated KV heads counted when tp exceeds the KV heads)
so a coefficient moves between two (model, preset, tp) as the ratio of its quantity, and
`roofline_coefs` builds all six from the quantities and a `Hardware` alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from fineserve_jax.formats import KV_BITS, PRESETS, KVFormat, get_preset
from fineserve_jax.formats.kv_split import kv_split
from fineserve_jax.scheduler.cost.profiles import canonical_model_name
from fineserve_jax.scheduler.footprint import WEIGHT_BYTES  # one bytes-per-weight table

# Activation speed-up of the GEMMs relative to bf16.
ACT_SPEED = {"bf16": 1.0, "fp8": 2.0, "int8": 2.0}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The sizes the cost model scales with (from a ModelConfig-like object)."""

    linear_params: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg: Any) -> "Geometry":
        if isinstance(cfg, Geometry):
            return cfg
        g = (lambda k: cfg[k]) if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k))
        if isinstance(cfg, Mapping):
            lp = cfg.get("linear_params")
        else:
            lp = cfg.linear_param_count() if hasattr(cfg, "linear_param_count") else None
        d, f, L = int(g("hidden_size")), int(g("intermediate_size")), int(g("num_layers"))
        h, kv, hd = int(g("num_heads")), int(g("num_kv_heads")), int(g("head_dim"))
        if lp is None:
            lp = L * (d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f)
        return cls(int(lp), int(g("vocab_size")), d, L, h, kv, hd)

    @property
    def param_count(self) -> int:
        return self.linear_params + 2 * self.vocab_size * self.hidden_size

    def weight_bytes(self, weights: str) -> float:
        # Linear layers in the preset's weight format; the LM head stays bf16.
        return self.linear_params * WEIGHT_BYTES[weights] + 2.0 * self.vocab_size * self.hidden_size

    def kv_bytes_per_token(self, kv: str, tp: int = 1) -> float:
        """KV bytes one token stores over a group of `tp` GPUs: with fewer KV heads than GPUs
        each head is replicated (`formats.kv_split`), so the group stores `tp` head rows."""
        heads = kv_split(self.num_heads, self.num_kv_heads, tp).stored_heads
        try:
            return float(KVFormat(self.num_layers, heads, self.head_dim, kv).bytes_per_token)
        except ValueError:
            return self.num_layers * 2 * heads * self.head_dim * KV_BITS[kv] / 8.0

    def gemm_flops_per_token(self) -> float:
        return 2.0 * self.linear_params

    def attn_flops_per_pair(self) -> float:
        return 4.0 * self.num_layers * self.num_heads * self.head_dim


# Profiled models that models/presets.py does not define (public HF config values).
_EXTRA_GEOMETRY = {
    "qwen-3-32b": dict(hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64,
                       num_kv_heads=8, head_dim=128, vocab_size=151936),
}


def preset_geometry(name: str) -> Optional[Geometry]:
    """The geometry of a known model by canonical name (models/presets.py or the extras)."""
    if name in _EXTRA_GEOMETRY:
        return Geometry.from_config(_EXTRA_GEOMETRY[name])
    try:
        from models.presets import ALL  # lazy: keep this package importable on its own
    except Exception:  # pragma: no cover - models package unavailable
        return None
    for key, cfg in ALL.items():
        if canonical_model_name(key) == name:
            return Geometry.from_config(cfg)
    return None


def preset_formats(name: str) -> Optional[Tuple[str, str, str]]:
    """(weights, activations, kv) formats of a precision preset; None if unknown."""
    p = PRESETS.get(name)
    return (p.weights, p.activations, p.kv) if p is not None else None


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Roofline parameters for `CostModel.synthetic` (per GPU)."""

    name: str = "H100-SXM"
    hbm_bytes_per_s: float = 3.35e12
    bf16_flops: float = 989e12  # dense
    bandwidth_efficiency: float = 0.7
    flops_efficiency: float = 0.5
    prefill_overhead_s: float = 2e-3
    decode_overhead_s: float = 1e-3

    @property
    def eff_bw(self) -> float:
        return self.hbm_bytes_per_s * self.bandwidth_efficiency

    @property
    def eff_flops(self) -> float:
        return self.bf16_flops * self.flops_efficiency


H100 = Hardware()
H200 = Hardware(name="H200", hbm_bytes_per_s=4.8e12)


def roofline_coefs(geom: Geometry, preset: str, tp: int, hw: Hardware) -> Tuple[np.ndarray, np.ndarray]:
    """(prefill [a, b, c], decode [d, e, f]) of a profile-free roofline:

        prefill = overhead + weight_bytes/(tp*BW) + 2*linear_params*T/(tp*FLOPS*speed)
                  + 4*layers*heads*head_dim*T*(C + T/2B)/(tp*FLOPS)
        decode  = overhead + weight_bytes/(tp*BW) + 2*linear_params*B/(tp*FLOPS*speed)
                  + kv_bytes_per_token*B*C/(tp*BW)
    with BW, FLOPS the hardware's effective (efficiency-scaled) HBM bandwidth and bf16 FLOP
    rate, speed 2 for fp8/int8 activations. Sums, not max: a pessimistic roofline.
    """
    p = get_preset(preset)
    speed = ACT_SPEED.get(p.activations, 1.0)
    w = geom.weight_bytes(p.weights) / tp / hw.eff_bw
    gemm = geom.gemm_flops_per_token() / tp / (hw.eff_flops * speed)
    attn = geom.attn_flops_per_pair() / tp / hw.eff_flops
    kv = geom.kv_bytes_per_token(p.kv, tp) / tp / hw.eff_bw
    return (np.array([hw.prefill_overhead_s + w, gemm, attn]),
            np.array([hw.decode_overhead_s + w, gemm, kv]))

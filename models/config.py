"""Model configuration read from a Hugging Face `config.json` (pure Python, no JAX)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

_REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "vocab_size",
)


class ConfigError(ValueError):
    """A config.json the framework cannot serve faithfully."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Geometry and numerics of a Llama-family decoder.

    `family` is one of "llama", "mistral", "qwen2".
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[Mapping[str, Any]] = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # q/k/v projection bias (Qwen2)
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    name: str = ""

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(
                    f"rope_scaling type {kind!r} is not supported (supported: 'llama3')"
                )

    @property
    def max_context(self) -> int:
        """Longest sequence this model serves faithfully (Mistral's window caps it)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def linear_param_count(self) -> int:
        d, f, h, kv, hd = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * h * hd * 2 + d * kv * hd * 2
        mlp = 3 * d * f
        return self.num_layers * (attn + mlp)

    def param_count(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.linear_param_count() + emb + head + norms

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # -- HF conversion --
    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any], name: str = "") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        family = None
        for a in archs:
            if a in SUPPORTED_ARCHITECTURES:
                family = SUPPORTED_ARCHITECTURES[a]
                break
        if family is None:
            if archs:
                raise ConfigError(
                    f"unsupported architectures {archs}; supported: "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}"
                )
            mt = cfg.get("model_type")
            if mt not in ("llama", "mistral", "qwen2"):
                raise ConfigError(
                    f"config has no supported 'architectures' entry and model_type {mt!r}; "
                    f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
            family = mt
        missing = [f for f in _REQUIRED_FIELDS if cfg.get(f) is None]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only 'silu')")
        if cfg.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported")
        # transformers >= 5 writes `rope_parameters` (theta inside); older ones
        # `rope_theta` + `rope_scaling`.
        rope_params = dict(cfg.get("rope_parameters") or {})
        theta = rope_params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope_params or None)
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        sliding = cfg.get("sliding_window") if family in ("mistral", "qwen2") else None
        if family == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            name=name,
        )

    def to_hf_dict(self) -> dict:
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.family]
        d = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        if self.family == "llama":
            d["attention_bias"] = self.attention_bias
        if self.sliding_window:
            d["sliding_window"] = self.sliding_window
            if self.family == "qwen2":
                d["use_sliding_window"] = True
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        return d

    @classmethod
    def from_json_file(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON: {e}") from None
        return cls.from_hf_dict(cfg, name=os.path.basename(os.path.dirname(os.path.abspath(path))))

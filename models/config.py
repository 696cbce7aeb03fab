"""Model configuration read from a Hugging Face `config.json` (pure Python, no JAX)."""

from __future__ import annotations

import dataclasses
import json
import math
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


_FAMILIES = ("llama", "mistral", "qwen2")
# our field -> the Hugging Face config.json field it comes from (named in errors)
_POSITIVE_INTS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
}
_ACTIVATIONS = ("silu", "swish")  # transformers maps both to SiLU


class ConfigError(ValueError):
    """A config.json the framework cannot serve faithfully; the message names the field."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_field(cfg: Mapping[str, Any], key: str, default=None):
    """`cfg[key]` as a JSON integer (default when absent or null); ConfigError naming `key`."""
    v = cfg.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    return v


def _float_field(cfg: Mapping[str, Any], key: str, default: float) -> float:
    v = cfg.get(key)
    if v is None:
        return default
    if not _is_number(v):
        raise ConfigError(f"{key} must be a number, got {v!r}")
    return float(v)


def _bool_field(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{key} must be true or false, got {v!r}")
    return v


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
        if self.family not in _FAMILIES:
            raise ConfigError(f"family {self.family!r} is not supported (supported: "
                              f"{', '.join(_FAMILIES)})")
        for ours, theirs in _POSITIVE_INTS.items():
            v = getattr(self, ours)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"{theirs} must be a positive integer, got {v!r}")
        for ours, theirs in (("rms_norm_eps", "rms_norm_eps"), ("rope_theta", "rope_theta")):
            v = getattr(self, ours)
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{theirs} must be a positive finite number, got {v!r}")
        for name in ("attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window)
                                                or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be a positive integer or null, got "
                              f"{self.sliding_window!r}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v < self.vocab_size):
                raise ConfigError(f"{name} must be a token id in [0, vocab_size="
                                  f"{self.vocab_size}), got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, Mapping):
                raise ConfigError(f"rope_scaling must be an object or null, got "
                                  f"{type(self.rope_scaling).__name__}")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(
                    f"rope_scaling type {kind!r} is not supported (supported: 'llama3')"
                )
            if kind == "llama3":
                for key in ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings"):
                    v = self.rope_scaling.get(key)
                    if not _is_number(v) or not math.isfinite(v) or v <= 0:
                        raise ConfigError(f"rope_scaling.{key} must be a positive number for "
                                          f"llama3 scaling, got {v!r}")
                if self.rope_scaling["high_freq_factor"] <= self.rope_scaling["low_freq_factor"]:
                    raise ConfigError("rope_scaling.high_freq_factor must exceed "
                                      "low_freq_factor")

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
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"the config must be a JSON object, got a JSON "
                              f"{type(cfg).__name__}")
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list):
            raise ConfigError(f"architectures must be a list, got {archs!r}")
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
            if mt not in _FAMILIES:
                raise ConfigError(
                    f"config has no supported 'architectures' entry and model_type {mt!r}; "
                    f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
            family = mt
        missing = [f for f in _REQUIRED_FIELDS if cfg.get(f) is None]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        num_heads = _int_field(cfg, "num_attention_heads")
        hidden = _int_field(cfg, "hidden_size")
        if num_heads < 1:
            raise ConfigError(f"num_attention_heads must be a positive integer, got {num_heads}")
        head_dim = _int_field(cfg, "head_dim")
        if head_dim is None:
            if hidden % num_heads:
                raise ConfigError(f"hidden_size ({hidden}) is not a multiple of "
                                  f"num_attention_heads ({num_heads}) and head_dim is not given")
            head_dim = hidden // num_heads
        act = cfg.get("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise ConfigError(f"hidden_act {act!r} is not supported (supported: "
                              f"{', '.join(_ACTIVATIONS)})")
        if cfg.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported")
        # transformers >= 5 writes `rope_parameters` (theta inside); older ones
        # `rope_theta` + `rope_scaling`.
        rope_params = cfg.get("rope_parameters") or {}
        if not isinstance(rope_params, Mapping):
            raise ConfigError(f"rope_parameters must be an object, got {rope_params!r}")
        rope_params = dict(rope_params)
        theta = rope_params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        if not _is_number(theta):
            raise ConfigError(f"rope_theta must be a number, got {theta!r}")
        scaling = cfg.get("rope_scaling") or (rope_params or None)
        if scaling is not None and not isinstance(scaling, Mapping):
            raise ConfigError(f"rope_scaling must be an object or null, got {scaling!r}")
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        sliding = cfg.get("sliding_window") if family in ("mistral", "qwen2") else None
        if family == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        if sliding is not None and not _is_int(sliding):
            raise ConfigError(f"sliding_window must be an integer or null, got {sliding!r}")
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            family=family,
            vocab_size=_int_field(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int_field(cfg, "intermediate_size"),
            num_layers=_int_field(cfg, "num_hidden_layers"),
            num_heads=num_heads,
            # absent or null: multi-head attention; an explicit 0 is refused by the checks
            num_kv_heads=_int_field(cfg, "num_key_value_heads", num_heads),
            head_dim=head_dim,
            rms_norm_eps=_float_field(cfg, "rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=_int_field(cfg, "max_position_embeddings", 4096),
            attention_bias=_bool_field(cfg, "attention_bias", family == "qwen2"),
            tie_word_embeddings=_bool_field(cfg, "tie_word_embeddings", False),
            sliding_window=sliding or None,
            bos_token_id=_int_field(cfg, "bos_token_id"),
            eos_token_id=eos if eos is None or _is_int(eos) else _bad("eos_token_id", eos),
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
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        return cls.from_hf_dict(cfg, name=os.path.basename(os.path.dirname(os.path.abspath(path))))


def _bad(key: str, value):
    raise ConfigError(f"{key} must be an integer token id, got {value!r}")

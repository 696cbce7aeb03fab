"""Named model configs: tiny embedded ones (random weights, CPU tests) and real-size shapes.

Real-size configs are for shape-only use (benchmarks, KV formats, the simulator); their
weights are never downloaded.
"""

from __future__ import annotations

from typing import Dict

from models.config import ModelConfig

# Byte tokenizer vocabulary: pad=0, bos=1, eos=2, bytes at 3..258; padded to 320.
TINY_VOCAB = 320

_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _tiny(name, family, layers, heads, kv_heads, **kw) -> ModelConfig:
    base = dict(
        family=family,
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        name=name,
    )
    base.update(kw)
    return ModelConfig(**base)


TINY: Dict[str, ModelConfig] = {
    "tiny-llama": _tiny(
        "tiny-llama",
        "llama",
        2,
        4,
        2,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_SCALING, "original_max_position_embeddings": 256},
    ),
    "tiny-mistral": _tiny("tiny-mistral", "mistral", 2, 4, 1, rope_theta=1e6, sliding_window=4096),
    "tiny-qwen2": _tiny(
        "tiny-qwen2", "qwen2", 3, 4, 2, rope_theta=1e6, attention_bias=True, tie_word_embeddings=True
    ),
}


def _real(name, family, vocab, hidden, inter, layers, heads, kv_heads, max_pos, **kw):
    return ModelConfig(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=kw.pop("head_dim", hidden // heads),
        max_position_embeddings=max_pos,
        name=name,
        **kw,
    )


REAL: Dict[str, ModelConfig] = {
    c.name: c
    for c in (
        _real("llama-3.1-8b", "llama", 128256, 4096, 14336, 32, 32, 8, 131072,
              rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING),
        _real("llama-3.1-70b", "llama", 128256, 8192, 28672, 80, 64, 8, 131072,
              rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING),
        _real("llama-3-8b", "llama", 128256, 4096, 14336, 32, 32, 8, 8192, rope_theta=500000.0),
        _real("mistral-7b", "mistral", 32768, 4096, 14336, 32, 32, 8, 32768, rope_theta=1e6),
        _real("qwen2.5-7b", "qwen2", 152064, 3584, 18944, 28, 28, 4, 32768,
              rope_theta=1e6, attention_bias=True),
        _real("qwen2.5-32b", "qwen2", 152064, 5120, 27648, 64, 40, 8, 32768,
              rope_theta=1e6, attention_bias=True),
        # SmolLM2-135M(-Instruct): the real test model's shape (CPU benchmarks).
        _real("smollm2-135m", "llama", 49152, 576, 1536, 30, 9, 3, 8192, rope_theta=100000.0,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
        # LLaMA-1 shapes of the MuxServe LMSYS workload (simulator only).
        _real("llama-7b", "llama", 32000, 4096, 11008, 32, 32, 32, 2048, rms_norm_eps=1e-6),
        _real("llama-13b", "llama", 32000, 5120, 13824, 40, 40, 40, 2048, rms_norm_eps=1e-6),
        _real("llama-30b", "llama", 32000, 6656, 17920, 60, 52, 52, 2048, rms_norm_eps=1e-6),
        _real("llama-65b", "llama", 32000, 8192, 22016, 80, 64, 64, 2048, rms_norm_eps=1e-5),
    )
}

ALL: Dict[str, ModelConfig] = {**TINY, **REAL}


def get_model_config(name: str) -> ModelConfig:
    try:
        return ALL[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; tiny (random weights): {', '.join(TINY)}; "
            f"real-size (shape only): {', '.join(REAL)}"
        ) from None

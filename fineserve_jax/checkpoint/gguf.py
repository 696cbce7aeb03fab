"""GGUF import (llama.cpp's file format) for the Llama-family architectures `llama` and `qwen2`.

A GGUF file holds the model's metadata (geometry, RoPE, tokenizer) as typed key/values and its
tensors under llama.cpp's names (`blk.0.attn_q.weight`), often block-quantized (Q4_1, Q8_0, the
K-quants...). The importer:

- reads the metadata into a `ModelConfig` (`gguf_model_config`); Mistral GGUFs use `llama`;
- serves the tensors under their Hugging Face names (`GGUFTensors`, a `TensorSource`),
  dequantized to float32 with the `gguf` package (the reference implementation of every
  block format), and undoes the row permutation llama.cpp's converter applies to
  `attn_q`/`attn_k` of the `llama` architecture (ggml's RoPE rotates adjacent pairs,
  Hugging Face's rotates the two halves of a head);
- fills the model through `param_map.build_model`, like every importer.

Every error names the file and the metadata key or tensor it concerns. The tokenizer stored in
the same metadata is built by `gguf_tokenizer.py`.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from fineserve_jax.checkpoint.common import CheckpointError, check_layer_count
from models.config import ConfigError, ModelConfig

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")

_REQUIRED = object()


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install "
                          "'fineserve_jax[gguf]' (or pip install gguf)") from None
    return gguf


def find_gguf_file(path: str) -> Optional[str]:
    """`path` itself when it is a `.gguf` file; the one `.gguf` file of a directory; else None.

    A directory holding several `.gguf` files is ambiguous and raises `CheckpointError`.
    """
    if os.path.isfile(path):
        return path if path.lower().endswith(".gguf") else None
    if not os.path.isdir(path):
        return None
    found = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds several GGUF files ({', '.join(found)}); pass the "
                              f"path of the one to load")
    return os.path.join(path, found[0]) if found else None


class GGUFFile:
    """One GGUF file: typed metadata by key and tensors by GGUF name (memory-mapped, lazy)."""

    def __init__(self, path: str):
        gguf = _import_gguf()
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such GGUF file")
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:  # noqa: BLE001 - ValueError/IndexError/... on damaged files
            raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                                  f"truncated or damaged?") from None
        self.tensors = {t.name: t for t in self._reader.tensors}
        size = os.path.getsize(path)
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(f"{path}: tensor {t.name!r} extends past the end of the file "
                                      f"(truncated?)")

    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def meta(self, key: str, kind: type, default=_REQUIRED):
        """The metadata value under `key` as `kind` (int, float, str, bool or list).

        Missing and `default` not given, or of another type: `CheckpointError` naming the key.
        """
        gguf = _import_gguf()
        field = self._reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}")
            return default
        vt = gguf.GGUFValueType
        main = field.types[0] if field.types else None
        ok = {
            int: main in (vt.UINT8, vt.INT8, vt.UINT16, vt.INT16, vt.UINT32, vt.INT32, vt.UINT64,
                          vt.INT64),
            float: main in (vt.FLOAT32, vt.FLOAT64, vt.UINT32, vt.INT32, vt.UINT64, vt.INT64),
            str: main == vt.STRING,
            bool: main == vt.BOOL,
            list: main == vt.ARRAY,
        }[kind]
        if not ok:
            raise CheckpointError(f"{self.path}: GGUF metadata {key!r} has type "
                                  f"{[t.name for t in field.types]}, expected {kind.__name__}")
        try:
            value = field.contents()
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: GGUF metadata {key!r} is not valid UTF-8 ({e})") \
                from None
        return kind(value) if kind is not list else value

    def dequantized(self, name: str) -> np.ndarray:
        """Tensor `name` (GGUF name) as float32, numpy layout ([rows, cols] = ggml [ne1, ne0])."""
        gguf = _import_gguf()
        t = self.tensors[name]
        check_tensor_type(self.path, name, t.tensor_type)
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001 - named with the tensor below
            raise CheckpointError(f"{self.path}: tensor {name!r} ({t.tensor_type.name}) could not "
                                  f"be dequantized: {e}") from None
        arr = np.asarray(arr, dtype=np.float32).reshape(_numpy_shape(t))
        if not np.isfinite(arr).all():
            raise CheckpointError(f"{self.path}: tensor {name!r} holds non-finite values")
        return arr


def _numpy_shape(t) -> Tuple[int, ...]:
    # ggml lists dimensions fastest-moving first; numpy the other way round.
    return tuple(int(d) for d in reversed(t.shape.tolist()))


@functools.lru_cache(maxsize=None)
def _can_dequantize(tensor_type) -> bool:
    gguf = _import_gguf()
    _, type_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    try:
        gguf.quants.dequantize(np.zeros(type_bytes, np.uint8), tensor_type)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 - a zero block of a plain type may not reshape
        # Plain element types (F32/F16 need a typed view, not bytes) are handled by dtype.
        return tensor_type.name in ("F32", "F16", "BF16")
    return tensor_type.name not in ("I8", "I16", "I32", "I64", "F64")


def check_tensor_type(path: str, name: str, tensor_type) -> None:
    if not _can_dequantize(tensor_type):
        raise CheckpointError(f"{path}: tensor {name!r} has ggml type {tensor_type.name}, which "
                              f"the gguf package cannot dequantize (supported: F32, F16, BF16, "
                              f"Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K- and IQ-quants)")


# -- names -------------------------------------------------------------------------------------
# GGUF tensor name <-> Hugging Face name. `{i}` is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_HF_GLOBAL_NAMES = {v: k for k, v in _GLOBAL_NAMES.items()}
# Tensors the importer reads itself rather than as model parameters.
_ROPE_FREQS = "rope_freqs.weight"
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _rename(name: str, global_names, layer_pattern, layer_names, layer_prefix: str):
    if name in global_names:
        return global_names[name]
    m = layer_pattern.match(name)
    if m and m.group(2) in layer_names:
        return f"{layer_prefix}{m.group(1)}.{layer_names[m.group(2)]}"
    return None


def gguf_name(hf_tensor: str) -> Optional[str]:
    """The GGUF tensor name of a Hugging Face tensor name (None if it has none)."""
    return _rename(hf_tensor, _HF_GLOBAL_NAMES, _HF_LAYER, _HF_LAYER_NAMES, "blk.")


def hf_name(gguf_tensor: str) -> Optional[str]:
    """The Hugging Face name of a GGUF tensor name (None for tensors outside the mapping)."""
    return _rename(gguf_tensor, _GLOBAL_NAMES, _GGUF_LAYER, _LAYER_NAMES, "model.layers.")


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `attn_q`/`attn_k` row order. w [n_heads * head_dim, ...] -> same shape.

    llama.cpp stores each head's rows as interleaved (re, im) pairs, row 2j / 2j+1 = Hugging
    Face rows j / j + head_dim/2, so its RoPE can rotate adjacent rows; Hugging Face rotates
    the first half of a head against the second.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of an even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- config ------------------------------------------------------------------------------------
def gguf_model_config(gf: GGUFFile) -> ModelConfig:
    """The `ModelConfig` described by a GGUF file's metadata (and its tensor shapes)."""
    path = gf.path
    arch = gf.meta("general.architecture", str)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} (general.architecture) is not "
                              f"supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    if gf.meta(f"{arch}.expert_count", int, 0):
        raise CheckpointError(f"{path}: a mixture-of-experts model ({arch}.expert_count="
                              f"{gf.meta(f'{arch}.expert_count', int)}) is not supported")
    for t in gf.tensors:
        if t != _ROPE_FREQS and hf_name(t) is None:
            raise CheckpointError(f"{path}: tensor {t!r} is not part of the {arch} architecture "
                                  f"this importer implements")
    if "token_embd.weight" not in gf.tensors:
        raise CheckpointError(f"{path}: GGUF file has no tensor 'token_embd.weight'")
    hidden = gf.meta(f"{arch}.embedding_length", int)
    heads = gf.meta(f"{arch}.attention.head_count", int)
    if heads <= 0:
        raise CheckpointError(f"{path}: {arch}.attention.head_count must be positive, got {heads}")
    kv_heads = gf.meta(f"{arch}.attention.head_count_kv", int, heads)
    if hidden % heads and not gf.has(f"{arch}.attention.key_length"):
        raise CheckpointError(f"{path}: {arch}.embedding_length {hidden} is not a multiple of "
                              f"{arch}.attention.head_count {heads}")
    head_dim = gf.meta(f"{arch}.attention.key_length", int, hidden // heads)
    value_dim = gf.meta(f"{arch}.attention.value_length", int, head_dim)
    if value_dim != head_dim:
        raise CheckpointError(f"{path}: {arch}.attention.value_length {value_dim} differs from "
                              f"key_length {head_dim}; not supported")
    rope_dims = gf.meta(f"{arch}.rope.dimension_count", int, head_dim)
    if rope_dims != head_dim:
        raise CheckpointError(f"{path}: partial RoPE ({arch}.rope.dimension_count={rope_dims}, "
                              f"head dim {head_dim}) is not supported")
    vocab = _numpy_shape(gf.tensors["token_embd.weight"])[0]
    meta_vocab = gf.meta(f"{arch}.vocab_size", int, vocab)
    if meta_vocab != vocab:
        raise CheckpointError(f"{path}: {arch}.vocab_size {meta_vocab} differs from the "
                              f"{vocab} rows of tensor 'token_embd.weight'")
    theta = gf.meta(f"{arch}.rope.freq_base", float, 10000.0)
    eps = gf.meta(f"{arch}.attention.layer_norm_rms_epsilon", float)
    bos = gf.meta("tokenizer.ggml.bos_token_id", int, None)
    eos = gf.meta("tokenizer.ggml.eos_token_id", int, None)
    try:
        cfg = ModelConfig(
            family=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=gf.meta(f"{arch}.feed_forward_length", int),
            num_layers=gf.meta(f"{arch}.block_count", int),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=eps,
            rope_theta=theta,
            rope_scaling=_rope_scaling(gf, arch, head_dim, theta),
            max_position_embeddings=gf.meta(f"{arch}.context_length", int, 4096),
            attention_bias="blk.0.attn_q.bias" in gf.tensors,
            tie_word_embeddings="output.weight" not in gf.tensors,
            bos_token_id=bos,
            eos_token_id=eos,
            name=gf.meta("general.name", str, "") or os.path.splitext(os.path.basename(path))[0],
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg


def _rope_scaling(gf: GGUFFile, arch: str, head_dim: int, theta: float):
    """Llama-3 RoPE scaling, which llama.cpp stores as per-frequency divisors (`rope_freqs`)."""
    kind = gf.meta(f"{arch}.rope.scaling.type", str, "none")
    if kind not in ("none", "llama3"):
        raise CheckpointError(f"{gf.path}: RoPE scaling {kind!r} ({arch}.rope.scaling.type) is "
                              f"not supported (supported: Llama-3 frequency factors)")
    if _ROPE_FREQS not in gf.tensors:
        return None
    factors = gf.dequantized(_ROPE_FREQS).reshape(-1).astype(np.float64)
    if factors.shape != (head_dim // 2,):
        raise CheckpointError(f"{gf.path}: tensor {_ROPE_FREQS!r} has {factors.size} values, "
                              f"expected head_dim/2 = {head_dim // 2}")
    try:
        return llama3_scaling_from_factors(factors, head_dim, theta)
    except ValueError as e:
        raise CheckpointError(f"{gf.path}: tensor {_ROPE_FREQS!r} does not follow Llama-3 RoPE "
                              f"scaling ({e}); other frequency factors are not supported") from None


def llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float):
    """The Llama-3 `rope_scaling` dict whose frequencies equal `inv_freq / factors`.

    None when every factor is 1 (no scaling). Llama-3 scaling divides the low frequencies by
    `factor`, keeps the high ones and blends the band between the wavelengths `orig / low` and
    `orig / high`; only those two thresholds matter, so `low_freq_factor` is fixed at 1, the
    rest is solved from the factors, and the result is verified. Raises `ValueError` when the
    factors follow no Llama-3 scaling.
    """
    from models.layers import rope_inv_freq

    factors = np.asarray(factors, np.float64)
    if np.all(factors == 1.0):
        return None
    inv = rope_inv_freq(head_dim, theta, None).astype(np.float64)
    wavelen = 2 * math.pi / inv
    factor = float(factors.max())
    tol = 1e-5 * factor
    ones = np.abs(factors - 1.0) <= tol
    full = np.abs(factors - factor) <= tol
    mid = ~ones & ~full
    if factor <= 1.0 or not full.any() or not ones.any():
        raise ValueError("the factors do not rise from 1 to a maximum")
    lo_edge = float(wavelen[full].min())   # wavelengths above the low-frequency threshold
    hi_edge = float(wavelen[ones].max())   # wavelengths below the high-frequency threshold
    # In the band, 1 / f = (1 - s) / factor + s with s = (orig / wavelen - 1) / (high - 1).
    s = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    with np.errstate(all="ignore"):
        if mid.sum() >= 2:
            a, b = np.polyfit(1.0 / wavelen[mid], s, 1)
            high = 1.0 - 1.0 / b
            orig = a * (high - 1.0)
        elif mid.sum() == 1:
            w1 = float(wavelen[mid][0])
            orig = math.sqrt(w1 * lo_edge)
            high = 1.0 + (orig / w1 - 1.0) / float(s[0])
        else:  # no wavelength in the band: any thresholds between the two groups will do
            orig = math.sqrt(hi_edge * lo_edge)
            high = math.sqrt(orig / hi_edge)
    if not (math.isfinite(orig) and math.isfinite(high) and orig > 0 and high > 1):
        raise ValueError("no Llama-3 thresholds reproduce the factors")
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": float(high), "original_max_position_embeddings": float(orig)}
    if not np.allclose(rope_inv_freq(head_dim, theta, scaling), inv / factors, rtol=1e-5, atol=0):
        raise ValueError("the fitted Llama-3 scaling does not reproduce the factors")
    return scaling


# -- tensors -----------------------------------------------------------------------------------
class GGUFTensors:
    """The tensors of a GGUF file by Hugging Face name, dequantized to float32 (a `TensorSource`).

    `attn_q`/`attn_k` rows of the `llama` architecture are put back into Hugging Face order;
    `qwen2` GGUFs keep Hugging Face's order (llama.cpp runs them with NeoX-style RoPE).
    """

    def __init__(self, gf: GGUFFile, cfg: ModelConfig):
        self.gf = gf
        self.path = gf.path
        self._arch = gf.meta("general.architecture", str)
        self._cfg = cfg

    def __contains__(self, name: str) -> bool:
        g = gguf_name(name)
        return g is not None and g in self.gf.tensors

    def keys(self) -> Iterator[str]:
        for t in self.gf.tensors:
            h = hf_name(t)
            if h is not None:
                yield h

    def shape(self, name: str) -> Tuple[int, ...]:
        return _numpy_shape(self.gf.tensors[gguf_name(name)])

    def get(self, name: str) -> np.ndarray:
        g = gguf_name(name)
        arr = self.gf.dequantized(g)
        if self._arch == "llama":
            kind = g.split(".")[2] if g.startswith("blk.") else ""
            if kind in ("attn_q", "attn_k"):
                heads = self._cfg.num_heads if kind == "attn_q" else self._cfg.num_kv_heads
                try:
                    arr = unpermute_rows(arr, heads)
                except ValueError as e:
                    raise CheckpointError(f"{self.path}: tensor {g!r}: {e}") from None
        return arr


def read_gguf_config(path: str) -> ModelConfig:
    """The `ModelConfig` of a `.gguf` file (or the one `.gguf` file of a directory)."""
    return gguf_model_config(open_gguf(path))


def open_gguf(path: str) -> GGUFFile:
    """The `GGUFFile` of a `.gguf` path or of the one `.gguf` file of a directory."""
    f = find_gguf_file(path)
    if f is None:
        raise CheckpointError(f"{path}: not a .gguf file nor a directory holding one")
    return GGUFFile(f)


def checked_tensors(gf: GGUFFile) -> Tuple[ModelConfig, "GGUFTensors"]:
    """The config and the (lazily dequantized) tensors of a GGUF, its layers and tensor types
    checked."""
    cfg = gguf_model_config(gf)
    tensors = GGUFTensors(gf, cfg)
    check_layer_count(tensors.keys(), cfg, gf.path, field=f"{cfg.family}.block_count")
    for t, rt in gf.tensors.items():
        check_tensor_type(gf.path, t, rt.tensor_type)
    return cfg, tensors


def dequantized_bytes(gf: GGUFFile) -> int:
    """Bytes of every tensor of the file as float32."""
    return sum(4 * int(np.prod(_numpy_shape(t))) for t in gf.tensors.values())


def load_gguf_checkpoint(path: "str | GGUFFile", dtype="float32"):
    """Load a Llama-family `.gguf` file (or the one of a directory) into a `Transformer`.

    Quantized tensors are dequantized to float32 and stored in `dtype`. Returns the model;
    `gguf_tokenizer.gguf_tokenizer(open_gguf(path))` builds the tokenizer of the same file.
    """
    from fineserve_jax.checkpoint.param_map import build_model

    gf = path if isinstance(path, GGUFFile) else open_gguf(path)
    cfg, tensors = checked_tensors(gf)
    return build_model(cfg, tensors, dtype, where=gf.path)


def gguf_tensor_types(path: str) -> Dict[str, str]:
    """{GGUF tensor name: ggml type name} of a file (for reports and tests)."""
    gf = open_gguf(path)
    return {n: t.tensor_type.name for n, t in gf.tensors.items()}

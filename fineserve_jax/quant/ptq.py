"""Post-training quantization of a float `Transformer` into a precision preset.

`quantize_model` replaces every projection `Linear` (q/k/v/o_proj, gate/up/down_proj) with
the preset's quantized layer from `models/quant_linear.py` (round-to-nearest, plus
AWQ-style scales for presets with `awq=True`). Embeddings, RMSNorm weights and `lm_head`
stay in the model dtype: they are a small part of a large model's weights (lm_head is
~7% of Llama-3.1-8B) and the most sensitive to quantization; the paper's presets
(AWQ, QoQ, fp8 W8A8) keep them in 16 bits as well. The model code is unchanged; only the
projection containers differ.

Quantized models save with `checkpoint.save_params` and restore into
`quantized_structure(cfg, preset, dtype)` (see `restore_quantized`).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fineserve_jax.formats import Preset, get_preset
from fineserve_jax.quant.projections import PROJECTIONS, projection_layers
from models.config import ModelConfig
from models.linear import Linear
from models.quant_linear import QuantLinear, layer_class
from models.transformer import Transformer


def _swap_projections(module: Transformer, preset: Preset,
                      act_scales: Optional[Mapping[str, jax.Array]]) -> None:
    """In place: each projection `Linear` -> the preset's quantized layer."""
    cls = layer_class(preset.weights, preset.activations)
    for path, parent, name in projection_layers(module):
        lin = getattr(parent, name)
        if not isinstance(lin, Linear):
            raise ValueError(f"{path} is already quantized ({type(lin).__name__}); quantize "
                             f"a float model")
        s = None if act_scales is None else act_scales[path]
        setattr(parent, name, cls.from_linear(lin, group_size=preset.group_size, act_scale=s))


def quantize_model(module: Transformer, preset: "Preset | str",
                   calibration: Optional[np.ndarray] = None, *,
                   act_scales: Optional[Mapping[str, np.ndarray]] = None) -> Transformer:
    """A quantized copy of a float `Transformer` (the input module is left unchanged).

    preset: a `Preset` or its name (`fineserve_jax.formats.PRESETS`). Presets with bf16
    weights (`org`, KV-only presets) return `module` itself: KV quantization belongs to
    the KV arena, not to the parameters.
    calibration: int token ids [n_seqs, seq_len] for presets with `awq=True`; None uses
    `awq.default_calibration` (8 x 64 seeded random ids). Ignored for RTN presets.
    act_scales: precomputed AWQ scales (path -> float32 [in], from
    `awq.search_act_scales`) instead of a calibration pass; only for `awq=True` presets.
    """
    preset = get_preset(preset)
    cls = layer_class(preset.weights, preset.activations)
    if cls is None:
        return module
    if act_scales is not None and not preset.awq:
        raise ValueError(f"act_scales given for preset {preset.name!r}, which has awq=False")
    if preset.awq and act_scales is None:
        from fineserve_jax.quant.awq import search_act_scales

        act_scales = search_act_scales(module, cls, preset.group_size, calibration).scales
    out = nnx.clone(module)
    _swap_projections(out, preset, act_scales if preset.awq else None)
    return out


def quantized_structure(cfg: ModelConfig, preset: "Preset | str",
                        dtype="bfloat16") -> Transformer:
    """The abstract (shape/dtype only, no memory) model `quantize_model` produces.

    Restore target for `checkpoint.restore_params`. `dtype` is the float dtype of the
    unquantized parameters (embeddings, norms, lm_head, biases).
    """
    from fineserve_jax.checkpoint import parse_dtype

    preset = get_preset(preset)
    dt = parse_dtype(dtype)

    def build():
        m = Transformer(cfg, dtype=dt, rngs=nnx.Rngs(0))
        if layer_class(preset.weights, preset.activations) is not None:
            scales = None
            if preset.awq:
                scales = {path: jnp.ones((getattr(parent, name).in_features,), jnp.float32)
                          for path, parent, name in projection_layers(m)}
            _swap_projections(m, preset, scales)
        return m

    return nnx.eval_shape(build)


def restore_quantized(cfg: ModelConfig, preset: "Preset | str", directory: str,
                      dtype="bfloat16") -> Transformer:
    """Restore a quantized model saved by `checkpoint.save_params` (no PTQ, no calibration)."""
    from fineserve_jax import checkpoint

    return checkpoint.restore_params(quantized_structure(cfg, preset, dtype), directory)


def _nbytes(x) -> int:
    return int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def param_bytes(module: nnx.Module, projections_only: bool = False) -> int:
    """Bytes of `nnx.Param` leaves (packing, scales, zeros, act_scale and biases included).

    Works on concrete and abstract (`nnx.eval_shape`) modules. With `projections_only`,
    only the q/k/v/o/gate/up/down layers are counted.
    """
    if not projections_only:
        return sum(_nbytes(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
    return sum(_nbytes(x) for _, parent, name in projection_layers(module)
               for x in jax.tree.leaves(nnx.state(getattr(parent, name), nnx.Param)))


__all__ = ["PROJECTIONS", "QuantLinear", "param_bytes", "projection_layers",
           "quantize_model", "quantized_structure", "restore_quantized"]

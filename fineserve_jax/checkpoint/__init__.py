"""Checkpoints: Hugging Face safetensors import, orbax save/restore of (quantized) params.

  common.py           CheckpointError, dtype names
  param_map.py        our parameter paths <-> HF tensor names; `build_model` from named tensors
  safetensors_dir.py  HF directories (config.json + safetensors, sharded or not), export
  orbax_params.py     orbax save/restore of every array of a model
"""

from fineserve_jax.checkpoint.common import CheckpointError, parse_dtype
from fineserve_jax.checkpoint.orbax_params import restore_params, save_params
from fineserve_jax.checkpoint.param_map import (
                                                TensorSource,
                                                abstract_model,
                                                build_model,
                                                hf_param_map,
                                                model_tensors,
)
from fineserve_jax.checkpoint.safetensors_dir import (
                                                SafetensorsDir,
                                                load_hf_checkpoint,
                                                read_hf_config,
                                                save_hf_checkpoint,
)

__all__ = ["CheckpointError", "parse_dtype", "restore_params", "save_params", "TensorSource",
           "abstract_model", "build_model", "hf_param_map", "model_tensors", "SafetensorsDir",
           "load_hf_checkpoint", "read_hf_config", "save_hf_checkpoint"]

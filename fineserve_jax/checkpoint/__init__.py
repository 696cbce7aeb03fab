"""Checkpoints: Hugging Face safetensors and GGUF import, orbax save/restore of (quantized) params.

  common.py           CheckpointError, dtype names, the layer-count check
  param_map.py        our parameter paths <-> HF tensor names; `build_model` from named tensors
  safetensors_dir.py  HF directories (config.json + safetensors, sharded or not), export
  gguf.py             GGUF files (llama.cpp): metadata -> config, dequantized tensors by HF name
  gguf_tokenizer.py   the tokenizer a GGUF's metadata describes, as a `tokenizers.Tokenizer`
  orbax_params.py     orbax save/restore of every array of a model
"""

from fineserve_jax.checkpoint.common import (
                                                CheckpointError,
                                                check_layer_count,
                                                parse_dtype,
)
from fineserve_jax.checkpoint.gguf import (
                                                GGUFFile,
                                                GGUFTensors,
                                                find_gguf_file,
                                                gguf_model_config,
                                                load_gguf_checkpoint,
                                                open_gguf,
                                                read_gguf_config,
)
from fineserve_jax.checkpoint.gguf_tokenizer import gguf_tokenizer
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

__all__ = [
                                                "CheckpointError",
                                                "GGUFFile",
                                                "GGUFTensors",
                                                "SafetensorsDir",
                                                "TensorSource",
                                                "abstract_model",
                                                "build_model",
                                                "check_layer_count",
                                                "find_gguf_file",
                                                "gguf_model_config",
                                                "gguf_tokenizer",
                                                "hf_param_map",
                                                "load_gguf_checkpoint",
                                                "load_hf_checkpoint",
                                                "model_tensors",
                                                "open_gguf",
                                                "parse_dtype",
                                                "read_gguf_config",
                                                "read_hf_config",
                                                "restore_params",
                                                "save_hf_checkpoint",
                                                "save_params",
]

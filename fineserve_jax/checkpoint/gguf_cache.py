"""A GGUF file converted once: its dequantized weights, config and tokenizer as a Hugging Face
directory in the per-user model cache, read back instead of the GGUF on later loads.

Why: reading a GGUF means parsing every metadata field (a 49k-token vocabulary is 150k small
reads with the `gguf` package) and dequantizing every tensor, several seconds for a 135M
model on a small CPU, paid by every process. The converted directory holds exactly what the
GGUF path produces (float32 tensors under Hugging Face names, the `ModelConfig`, the
tokenizer with its BOS/EOS tokens and chat template), so a load from it gives the same model
(tested). The cache entry is named after the file's path, size and modification time;
conversions larger than `FINESERVE_JAX_GGUF_CACHE_MAX_BYTES` (default 4 GiB of float32) or
with `FINESERVE_JAX_GGUF_CACHE=0` are not written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

log = logging.getLogger("fineserve_jax")

FORMAT = 1  # bump when the converted layout changes: old entries are then ignored
ENABLE_ENV = "FINESERVE_JAX_GGUF_CACHE"
MAX_ENV = "FINESERVE_JAX_GGUF_CACHE_MAX_BYTES"
DONE = "converted.json"  # written last: its presence marks a complete entry


def entry_dir(gguf_path: str) -> str:
    from fineserve_jax.real_models import model_cache_dir

    st = os.stat(gguf_path)
    key = f"{FORMAT}|{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}"
    return os.path.join(model_cache_dir(), "converted",
                        hashlib.sha256(key.encode()).hexdigest()[:24])


def lookup(gguf_path: str) -> Optional[str]:
    """The converted directory of this file, if a complete one exists."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return None
    d = entry_dir(gguf_path)
    return d if os.path.isfile(os.path.join(d, DONE)) else None


class DictTensors:
    """A `TensorSource` over a dict of arrays (HF names)."""

    def __init__(self, arrays: Dict[str, np.ndarray]):
        self.arrays = arrays

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def keys(self) -> Iterator[str]:
        return iter(self.arrays)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.arrays[name].shape)

    def get(self, name: str) -> np.ndarray:
        return self.arrays[name]


def store(gguf_path: str, config, arrays: Dict[str, np.ndarray], tokenizer) -> Optional[str]:
    """Write the converted directory (atomically); None when caching is off or too large."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return None
    size = sum(a.nbytes for a in arrays.values())
    limit = int(os.environ.get(MAX_ENV, 4 << 30))
    if size > limit:
        log.info("%s: not caching its %.1f GiB float32 conversion (limit %s=%d)", gguf_path,
                 size / 2**30, MAX_ENV, limit)
        return None
    from safetensors.numpy import save_file

    final = entry_dir(gguf_path)
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".tmp-")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf_dict(), f, indent=2)
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                  os.path.join(tmp, "model.safetensors"))
        if tokenizer is not None and getattr(tokenizer, "_tok", None) is not None:
            tokenizer._tok.save(os.path.join(tmp, "tokenizer.json"))
            specials = {k: v for k, v in (tokenizer.special_tokens or {}).items() if v is not None}
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump({**specials, "chat_template": tokenizer.chat_template}, f, indent=2)
        with open(os.path.join(tmp, DONE), "w") as f:
            json.dump({"format": FORMAT, "source": os.path.abspath(gguf_path), "bytes": size,
                       "name": config.name}, f)
        if os.path.isdir(final):  # another process converted it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)
        return final
    except OSError as e:  # a cache that cannot be written must not fail the load
        log.warning("could not cache the conversion of %s in %s (%s)", gguf_path, final, e)
        return None

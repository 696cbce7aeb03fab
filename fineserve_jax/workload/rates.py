"""MuxServe-style per-model rate files (`../shared/data/rates/*.yaml`). Pure Python + PyYAML.

    cluster: {nnodes: 4, ngpus_per_node: 8}
    models:
    - {name: llm-1, model: /path/to/huggyllama/llama-13b, rate: 8.13}

The model size ("llama-13b") is the lower-cased basename of the checkpoint path, which is
also the name of the matching real-size config in `models/presets.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
from typing import List, Optional, Sequence, Union

import yaml

from fineserve_jax.workload.data import data_file
from fineserve_jax.workload.spec import ModelLoad

LMSYS_CONDENSE = (500, 800, 1200, 1600, 2000)


class RatesFileError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelRate:
    name: str  # "llm-1"
    model: str  # size / preset name derived from the checkpoint path, e.g. "llama-13b"
    rate: float  # mean requests per second
    checkpoint: str = ""  # the path as written in the file (meaningless outside its origin)


@dataclasses.dataclass(frozen=True)
class RatesConfig:
    nnodes: int
    ngpus_per_node: int
    models: Sequence[ModelRate]
    path: str = ""

    @property
    def num_gpus(self) -> int:
        return self.nnodes * self.ngpus_per_node

    @property
    def total_rate(self) -> float:
        return float(sum(m.rate for m in self.models))

    def rates(self) -> dict:
        return {m.name: m.rate for m in self.models}

    def model_of(self) -> dict:
        """name -> model size (e.g. {"llm-1": "llama-13b"})."""
        return {m.name: m.model for m in self.models}

    def as_model_loads(self, slo_ttft_s: Optional[float] = None, scale: float = 1.0) -> List[ModelLoad]:
        """ModelLoads for `generate_workload` (rates multiplied by `scale`)."""
        return [ModelLoad(m.name, m.rate * scale, slo_ttft_s) for m in self.models]


def model_size_from_path(path: str) -> str:
    base = posixpath.basename(str(path).replace("\\", "/").rstrip("/"))
    return base.lower()


def load_rates_yaml(path: Union[str, os.PathLike]) -> RatesConfig:
    """Parse a MuxServe rates YAML; errors name the file and the offending entry."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise RatesFileError(f"{path}: cannot open: {e}") from None
    except yaml.YAMLError as e:
        raise RatesFileError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise RatesFileError(f"{path}: expected a mapping with 'cluster' and 'models'")
    cluster = doc.get("cluster")
    if not isinstance(cluster, dict):
        raise RatesFileError(f"{path}: missing 'cluster' mapping (nnodes, ngpus_per_node)")
    try:
        nnodes = int(cluster["nnodes"])
        ngpus = int(cluster["ngpus_per_node"])
    except (KeyError, TypeError, ValueError):
        raise RatesFileError(f"{path}: cluster needs integer 'nnodes' and 'ngpus_per_node', got {cluster!r}") from None
    if nnodes <= 0 or ngpus <= 0:
        raise RatesFileError(f"{path}: cluster shape must be positive, got {nnodes} x {ngpus}")
    entries = doc.get("models")
    if not isinstance(entries, list) or not entries:
        raise RatesFileError(f"{path}: 'models' must be a non-empty list")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"name", "model", "rate"} <= set(e):
            raise RatesFileError(f"{path}: models[{i}] needs name, model and rate, got {e!r}")
        try:
            rate = float(e["rate"])
        except (TypeError, ValueError):
            raise RatesFileError(f"{path}: models[{i}] ({e.get('name')}): rate is not a number: {e['rate']!r}") from None
        if not (rate >= 0 and math.isfinite(rate)):
            raise RatesFileError(f"{path}: models[{i}] ({e.get('name')}): rate must be >= 0, got {rate}")
        out.append(ModelRate(str(e["name"]), model_size_from_path(e["model"]), rate, str(e["model"])))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise RatesFileError(f"{path}: duplicate model names {names}")
    return RatesConfig(nnodes, ngpus, tuple(out), path)


def lmsys_rates(condense: int = 500) -> RatesConfig:
    """The shared MuxServe LMSYS day-55 rates, time-compressed by `condense`."""
    if condense not in LMSYS_CONDENSE:
        raise ValueError(f"condense must be one of {LMSYS_CONDENSE}, got {condense}")
    return load_rates_yaml(data_file("rates", f"lmsys_day55_condense{condense}.yaml"))

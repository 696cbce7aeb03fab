"""Workloads: arrival processes, per-model rates, length distributions, trace replay.

Pure Python + numpy (no JAX); everything random is seeded.
"""

from fineserve_jax.workload.arrivals import (
    ARRIVAL_PROCESSES,
    arrival_times,
    empirical_cv,
    inter_arrival_gaps,
    power_law_rates,
    power_law_weights,
)
from fineserve_jax.workload.data import data_dir, data_file
from fineserve_jax.workload.lengths import (
    LENGTH_PRESETS,
    LengthDist,
    RequestLengths,
    as_lengths,
    fixed_lengths,
    lmsys,
    sharegpt,
)
from fineserve_jax.workload.prefixes import PrefixSharing, prompt_tokens, token_stream
from fineserve_jax.workload.rates import (
    ModelRate,
    RatesConfig,
    RatesFileError,
    lmsys_rates,
    load_rates_yaml,
    model_size_from_path,
)
from fineserve_jax.workload.spec import (
    ModelLoad,
    WorkloadRequest,
    as_model_loads,
    generate_workload,
    workload_stats,
)
from fineserve_jax.workload.traces import (
    Trace,
    TraceError,
    load_azure_trace,
    replay_trace,
)

__all__ = [
    "ARRIVAL_PROCESSES", "arrival_times", "empirical_cv", "inter_arrival_gaps",
    "power_law_rates", "power_law_weights", "data_dir", "data_file", "LENGTH_PRESETS",
    "LengthDist", "RequestLengths", "as_lengths", "fixed_lengths", "lmsys", "sharegpt",
    "ModelRate", "RatesConfig", "RatesFileError", "lmsys_rates", "load_rates_yaml",
    "model_size_from_path", "ModelLoad", "WorkloadRequest", "as_model_loads",
    "generate_workload", "workload_stats", "Trace", "TraceError", "load_azure_trace",
    "replay_trace", "PrefixSharing", "prompt_tokens", "token_stream",
]

"""Step-time cost model: prefill and decode latency per (model, precision preset, TP size,
MPS share), fitted to profile CSVs. Pure Python + numpy (no JAX): the local scheduler, the
global placement and the simulator all call it.

  profiles  the profile CSV format (`read_profile_csv`, `default_profile_dir`)
  fit       the step-time model and its non-negative relative least-squares fit
  geometry  model sizes, precision formats and GPU roofline the coefficients scale with
  model     `CostModel`: resolution (profiled, MPS-interpolated, derived, synthetic) and
            prediction; `load_cost_model` for the simulator

`python -m fineserve_jax.scheduler.cost [CSV ...]` prints every group's fit errors. All
modules log as `fineserve_jax.scheduler.cost`.
"""

from fineserve_jax.scheduler.cost.fit import (
    GroupFit,
    decode_features,
    fit_group,
    fit_points,
    nnls_relative,
    prefill_features,
)
from fineserve_jax.scheduler.cost.geometry import (
    ACT_SPEED,
    H100,
    H200,
    WEIGHT_BYTES,
    Geometry,
    Hardware,
    roofline_coefs,
)
from fineserve_jax.scheduler.cost.model import (
    MIN_TIME_S,
    CostModel,
    UnknownModelError,
    format_fit_report,
    load_cost_model,
)
from fineserve_jax.scheduler.cost.profiles import (
    DEFAULT_PROFILE_FILES,
    ENV_VAR,
    PROFILE_COLUMNS,
    ProfileFormatError,
    ProfilePoint,
    canonical_model_name,
    default_profile_dir,
    read_profile_csv,
)

__all__ = [
    "ACT_SPEED",
    "DEFAULT_PROFILE_FILES",
    "ENV_VAR",
    "H100",
    "H200",
    "MIN_TIME_S",
    "PROFILE_COLUMNS",
    "WEIGHT_BYTES",
    "CostModel",
    "Geometry",
    "GroupFit",
    "Hardware",
    "ProfileFormatError",
    "ProfilePoint",
    "UnknownModelError",
    "canonical_model_name",
    "decode_features",
    "default_profile_dir",
    "fit_group",
    "fit_points",
    "format_fit_report",
    "load_cost_model",
    "nnls_relative",
    "prefill_features",
    "read_profile_csv",
    "roofline_coefs",
]

"""Scheduling: the global placement of models onto GPUs (`placement`, its plan file `plan`,
memory `footprint`, analytic `load_estimate`), the per-device local scheduler (`local`,
`admission`, `execution`) and the step-time cost model (`cost`, `step_cost`).

Pure Python: importing this package (or any module in it) never imports JAX. The names below
are the light placement API; import the other modules explicitly.
"""

from fineserve_jax.scheduler.placement import (
                                               POLICIES,
                                               PlacementConfig,
                                               PlacementError,
                                               Replan,
                                               ServedModel,
                                               place,
                                               replan,
)
from fineserve_jax.scheduler.plan import (
                                               ClusterSpec,
                                               DevicePlan,
                                               PlacedModel,
                                               PlacementPlan,
                                               PlanError,
                                               check_plan,
)

__all__ = ["POLICIES", "PlacementConfig", "PlacementError", "Replan", "ServedModel", "place",
           "replan", "ClusterSpec", "DevicePlan", "PlacedModel", "PlacementPlan", "PlanError",
           "check_plan"]

"""Discrete-event cluster simulator: the engine's local scheduler and slab allocator on every
device of a placement plan, with step times from the cost model. Pure Python (no JAX)."""

from fineserve_jax.sim.cluster import SimResult, run_system, simulate
from fineserve_jax.sim.config import KV_MODES, SYSTEMS, SimConfig, System, get_system
from fineserve_jax.sim.device import DeviceResult, DeviceSim
from fineserve_jax.sim.routing import route
from fineserve_jax.sim.step_cost import CostModelStepCost

__all__ = ["SimResult", "run_system", "simulate", "KV_MODES", "SYSTEMS", "SimConfig", "System",
           "get_system", "DeviceResult", "DeviceSim", "route", "CostModelStepCost"]

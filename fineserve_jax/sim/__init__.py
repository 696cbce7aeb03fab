"""Cluster simulator: the engine's device loop (scheduler, slab allocator, submission rule) on
every device of a placement plan, with step times from the cost model on a virtual clock.
Pure Python (no JAX)."""

from fineserve_jax.sim.cluster import SimResult, run_system, simulate
from fineserve_jax.sim.config import KV_MODES, SYSTEMS, SimConfig, System, get_system
from fineserve_jax.sim.device import DeviceResult, DeviceSim
from fineserve_jax.cluster.routing import route
from fineserve_jax.sim.executor import CostModelExecutor

__all__ = ["SimResult", "run_system", "simulate", "KV_MODES", "SYSTEMS", "SimConfig", "System",
           "get_system", "DeviceResult", "DeviceSim", "route", "CostModelExecutor"]

"""Scale-out: request routing shared with the simulator (pure Python), a node of device groups
served from one process (`cluster.node`, JAX), and the Ray cluster driver
(`cluster.ray_cluster`, needs the `cluster` extra).

Only the pure-Python parts are imported here, so the simulator imports the router without
JAX; import `fineserve_jax.cluster.node` / `.ray_cluster` explicitly."""

from fineserve_jax.cluster.routing import RouteItem, mean_lengths, route, route_requests
from fineserve_jax.cluster.topology import local_gpus, node_devices, node_plan, plan_nodes

__all__ = ["RouteItem", "mean_lengths", "route", "route_requests", "local_gpus", "node_devices",
           "node_plan", "plan_nodes"]

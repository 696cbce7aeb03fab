"""Which devices of a placement plan live on which node, and their local GPU indices.
Pure Python.

GPU ranks in a plan are global (`node * gpus_per_node + local`); a node's process sees its
GPUs as local devices 0..gpus_per_node-1 (on CPU, virtual devices stand in for them)."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

from fineserve_jax.scheduler.plan import DevicePlan, PlacementPlan


def plan_nodes(plan: PlacementPlan) -> Dict[int, List[DevicePlan]]:
    """node -> its devices (only nodes that hold a device), in device order."""
    out: Dict[int, List[DevicePlan]] = {}
    for d in plan.devices:
        nodes = {plan.cluster.node_of(g) for g in d.gpus}
        if len(nodes) != 1:
            raise ValueError(f"device {d.id}: GPUs {list(d.gpus)} span nodes {sorted(nodes)}")
        out.setdefault(nodes.pop(), []).append(d)
    return dict(sorted(out.items()))


def node_devices(plan: PlacementPlan, node: int) -> List[DevicePlan]:
    nodes = plan_nodes(plan)
    if node not in nodes:
        raise ValueError(f"node {node} holds no device of the plan (nodes with devices: "
                         f"{sorted(nodes)}; the cluster has {plan.cluster.nodes})")
    return nodes[node]


def node_plan(plan: PlacementPlan, node: int) -> PlacementPlan:
    """The plan restricted to one node's devices (what a node routes over)."""
    return dataclasses.replace(plan, devices=tuple(node_devices(plan, node)))


def local_gpus(plan: PlacementPlan, device: DevicePlan) -> Tuple[int, ...]:
    """The device's GPUs as indices into its node's local devices."""
    return tuple(g % plan.cluster.gpus_per_node for g in device.gpus)

"""Expert-parallel load balancing (EPLB) for training: redundant experts placed by DeepSeek's hierarchical planner.

Modules, one job each: ``planner`` (where each expert goes: ``plan_placement``, ``rank_loads``),
``placement`` (a plan as the layer uses it: which slot each kept pair goes to), ``move`` (weights and
optimizer moments to new slots with all-to-alls), ``gradients`` (replicas sum their gradients; norms count
each logical expert once), ``layout`` (a model's placements: apply plans, the logical layout of
checkpoints), ``balancer`` (re-planning every N training steps from the loads routed meanwhile).
docs/eplb.md describes the whole.
"""
from .planner import plan_placement, rank_loads

__all__ = ["plan_placement", "rank_loads"]

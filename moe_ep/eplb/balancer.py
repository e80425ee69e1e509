"""Re-placement while training: every N optimizer steps, each MoE layer is re-planned from the loads routed in
those steps, and its weights and optimizer moments move to the new slots.

    balancer = Rebalancer(model, interval=N)
    ...each step: backward, sync_gradients, clip, optimizer.step()
    event = balancer.after_step(optimizer)      before update_moe_bias (which clears the step's loads)
    update_moe_bias(model)

``after_step`` adds each layer's loads of the step (``MoELayer.load_accum``: global counts, the same on
every rank) to a window; after every N-th step (counted in ``steps``, which a resumed run sets to its
step) it plans each layer from the window (``MoELayer.plan``, so the same plan on every rank) and
empties the window. It measures both placements on the window's loads,

    max/mean per-rank load = max_r load_r / mean_r load_r       (``planner.rank_loads``: even split over replicas)

and moves the layer to the new plan (``MoELayer.set_placement``: all-to-alls over the EP group, no
gather) only when that lowers it by at least ``MIN_GAIN``; otherwise the layer keeps its placement (a
move costs an all-to-all of the expert weights and both AdamW moments, which sampling noise in the loads
does not repay; and the planner is a heuristic: on some loads the placement in force is as good). A move changes where pairs are computed, not
what: the losses that follow equal those without it (up to the order of floating-point sums). The event
it returns holds, per layer, max/mean before the re-plan and under the placement in force after it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..model_moe import moe_layers
from .planner import rank_loads

MIN_GAIN = 0.01  # the least drop of max/mean per-rank load (on the window's loads) that a move must bring


def max_over_mean(load_E: torch.Tensor, phy2log_P: torch.Tensor, n_ranks: int) -> float:
    """``max_r load_r / mean_r load_r`` of ``load_E`` placed by ``phy2log_P`` on ``n_ranks`` ranks (1 without load)."""
    load_R = rank_loads(load_E, phy2log_P, n_ranks)
    mean = load_R.mean().item()
    return load_R.max().item() / mean if mean > 0 else 1.0


def compare_plans(load_E: torch.Tensor, current_P: torch.Tensor, planned_P: torch.Tensor, n_ranks: int) -> tuple:
    """``(before, after)``: max/mean of ``load_E`` under the current placement, and under the one to keep: the
    planned one when it is lower by ``MIN_GAIN`` or more (then ``after < before``: move), else the current one
    (``after == before``)."""
    before = max_over_mean(load_E, current_P, n_ranks)
    planned = max_over_mean(load_E, planned_P, n_ranks)
    return before, planned if planned <= before - MIN_GAIN else before


class Rebalancer:
    """Re-plans the MoE layers of ``model`` every ``interval`` applied optimizer steps (module docstring).

    ``steps``: optimizer updates done (set it to the resumed step when a run resumes).
    """

    def __init__(self, model: nn.Module, interval: int):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"Rebalancer: interval must be a positive int of optimizer steps, got {interval!r}")
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("Rebalancer: the model has no MoE layer to balance")
        self.interval = interval
        self.steps = 0
        self.window_LE = [torch.zeros_like(layer.load_accum) for layer in self.layers]

    def after_step(self, optimizer: Optional[torch.optim.Optimizer]) -> Optional[dict]:
        """Count an applied step and its loads; after every ``interval``-th, re-plan every layer (collective) and
        return ``{"step", "before": [max/mean per layer], "after": [...]}``, else None."""
        for window_E, layer in zip(self.window_LE, self.layers):
            window_E += layer.load_accum
        self.steps += 1
        if self.steps % self.interval:
            return None
        before, after = [], []
        for window_E, layer in zip(self.window_LE, self.layers):
            placement = layer.plan(window_E)
            was, now = compare_plans(window_E, layer.phy2log(), placement.phy2log_P, layer.parallel.ep_size)
            before.append(was)
            after.append(now)
            if now < was:
                layer.set_placement(placement, optimizer)
            window_E.zero_()
        return {"step": self.steps, "before": before, "after": after}

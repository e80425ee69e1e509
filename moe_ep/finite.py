"""The opt-in finiteness check of an MoE layer (``MoEConfig.check_finite``), agreed by every rank.

Each forward counts the NaN and Inf values at three points, in data-flow order:

    input            x_TH, the layer's input
    router logits    x W^T in the router dtype
    expert outputs   y_TH, routed experts (after combine) + shared experts, per token

The counts travel in the statistics all-reduce the layer already makes
(``balance.global_counts``), so every rank learns the totals over the world
without another collective and all ranks raise ``NonFiniteError`` together
even when only one rank saw a bad value (a rank raising alone would leave the
others waiting in their next collective). Reading the totals is one host sync.
"""
from __future__ import annotations

import torch

CHECKED = ("input", "router logits", "expert outputs")


class NonFiniteError(ValueError):
    """NaN or Inf met by ``check_finite``; the message names the layer, the forward and where."""


def count_nonfinite(x_TH: torch.Tensor, logits_TE: torch.Tensor, y_TH: torch.Tensor) -> torch.Tensor:
    """NaN / Inf counts of (input, router logits, expert outputs): float64 ``[3]``, no host sync."""
    return torch.stack([(~torch.isfinite(t.detach())).sum() for t in (x_TH, logits_TE, y_TH)]).double()


def raise_if_nonfinite(world_C: torch.Tensor, local_C: torch.Tensor, where: str) -> None:
    """Raise ``NonFiniteError`` on every rank if any rank counted a non-finite value.

    ``world_C``: the counts summed over the world (identical on every rank);
    ``local_C``: this rank's. ``where`` names the layer and the forward.
    """
    world, local = world_C.tolist(), local_C.tolist()
    if not any(world):
        return
    found = [f"{name}: {int(n_local)} on this rank, {int(n_world)} on all ranks"
             for name, n_world, n_local in zip(CHECKED, world, local) if n_world]
    raise NonFiniteError(f"{where}: NaN or Inf in " + "; ".join(found) + " (check_finite=True)")

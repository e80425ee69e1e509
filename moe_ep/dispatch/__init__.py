"""Dispatchers: move (token, expert) pairs to their experts and the results back."""
from __future__ import annotations

from ..parallel.state import ParallelState
from .all_to_all import AllToAllDispatcher
from .hierarchical import HierarchicalDispatcher
from .local import LocalDispatcher

__all__ = ["AllToAllDispatcher", "HierarchicalDispatcher", "LocalDispatcher", "make_dispatcher"]


def make_dispatcher(choice: str, parallel: ParallelState, n_experts: int, overlap: bool = True):
    """The dispatcher for ``MoEConfig.dispatcher`` = ``choice`` on ``parallel``.

    One EP rank: ``LocalDispatcher`` whatever the choice. Otherwise ``flat``
    (``AllToAllDispatcher``), ``hierarchical`` (``HierarchicalDispatcher``),
    or ``auto``: hierarchical when the EP group spans more than one node
    (``parallel.nodes > 1``) with more than one rank on each (with one rank
    per node both send the same rows across nodes, and the second hop would
    only copy rows to itself) and the state has the node groups that
    ``init_expert_parallel`` builds; flat otherwise.
    """
    if parallel.ep_size == 1:
        return LocalDispatcher()
    if choice == "auto":
        has_node_groups = parallel.internode_group is not None and parallel.intranode_group is not None
        spans_nodes = parallel.nodes > 1 and parallel.ranks_per_node > 1
        choice = "hierarchical" if spans_nodes and has_node_groups else "flat"
    if choice == "hierarchical":
        return HierarchicalDispatcher(parallel, n_experts, overlap)
    if choice == "flat":
        return AllToAllDispatcher(parallel, n_experts, overlap)
    raise ValueError(f"make_dispatcher: unknown dispatcher {choice!r}; choose from auto, flat, hierarchical")

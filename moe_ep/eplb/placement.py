"""A placement as the layer uses it: which logical expert each physical slot holds, and which slot each kept
(token, expert) pair goes to.

``Placement(phy2log_P, n_experts, n_ranks, n_nodes)``: P slots, rank-major (rank r holds slots
``[r S, (r + 1) S)``, ``S = P / n_ranks``; node m the ranks ``[m n_ranks / n_nodes, ...)``), every logical
expert in at least one slot, and all slots of a logical expert on one node (checked; ``plan_placement``
makes such plans). Replica choice (``slots``), for the kept pairs of one sending rank:

    slot(t, e) = slots_EC[e, (j + rank) mod c_e]       j = how many kept pairs of e precede (t, e) on this
                                                         rank (token-major order), c_e = replicas of e

so each replica of e gets within one pair of an equal share of every sender's pairs (the offset
``rank`` spreads the remainders over the replicas), whatever the routing, without communication. Since
the replicas of e share a node, the choice never changes the nodes a token reaches: the two-hop
dispatcher sends exactly the inter-node rows it would send with one slot per expert. Inside that node
the choice changes only which ranks the second hop (or the flat dispatcher) reaches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def check_phy2log(phy2log_P: torch.Tensor, n_experts: int, n_ranks: int, n_nodes: int) -> None:
    """``ValueError`` naming what is wrong unless ``phy2log_P`` is a valid placement (module docstring)."""
    if not torch.is_tensor(phy2log_P) or phy2log_P.dim() != 1 or phy2log_P.dtype != torch.int64:
        raise ValueError(f"placement: phy2log must be a 1-D int64 tensor, got "
                         f"{getattr(phy2log_P, 'dtype', type(phy2log_P).__name__)} of shape "
                         f"{tuple(getattr(phy2log_P, 'shape', ()))}")
    P = phy2log_P.numel()
    if P < n_experts or P % n_ranks or n_ranks % n_nodes:
        raise ValueError(f"placement: {P} slots for {n_experts} experts on {n_ranks} ranks of {n_nodes} nodes; "
                         f"need at least one slot per expert, the same number of slots per rank and whole nodes")
    if phy2log_P.min() < 0 or phy2log_P.max() >= n_experts:
        raise ValueError(f"placement: phy2log holds ids outside [0, {n_experts})")
    count_E = torch.bincount(phy2log_P, minlength=n_experts)
    if (count_E == 0).any():
        missing = (count_E == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"placement: logical experts {missing} have no slot")
    node_P = torch.arange(P) // (P // n_nodes)
    first_node_E = torch.full((n_experts,), n_nodes, dtype=torch.int64).scatter_reduce(0, phy2log_P, node_P, "amin")
    last_node_E = torch.zeros(n_experts, dtype=torch.int64).scatter_reduce(0, phy2log_P, node_P, "amax")
    spread = (first_node_E != last_node_E).nonzero().flatten()
    if spread.numel():
        raise ValueError(f"placement: the replicas of logical experts {spread[:5].tolist()} lie on several nodes; "
                         f"a logical expert's slots must share one node")


@dataclass(frozen=True, eq=False)
class Placement:
    """Slots of one MoE layer's experts over an EP group (module docstring); built once per plan, on every rank.

    phy2log_P: logical expert of each slot (int64, CPU); derived: count_E (replicas per expert),
    slots_EC (the slots of each expert, ascending, padded with -1), primary_P (the first slot of each
    expert: the one norms and ``full_state_dict`` read).
    """

    phy2log_P: torch.Tensor
    n_experts: int
    n_ranks: int
    n_nodes: int = 1
    count_E: torch.Tensor = field(init=False, repr=False)
    slots_EC: torch.Tensor = field(init=False, repr=False)
    primary_P: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        phy2log_P = self.phy2log_P.detach().cpu()
        check_phy2log(phy2log_P, self.n_experts, self.n_ranks, self.n_nodes)
        count_E = torch.bincount(phy2log_P, minlength=self.n_experts)
        order_P = torch.argsort(phy2log_P, stable=True)  # slots grouped by expert, ascending within
        first_E = torch.cumsum(count_E, 0) - count_E
        column_P = torch.arange(phy2log_P.numel()) - first_E[phy2log_P[order_P]]
        slots_EC = torch.full((self.n_experts, int(count_E.max())), -1, dtype=torch.int64)
        slots_EC[phy2log_P[order_P], column_P] = order_P
        object.__setattr__(self, "phy2log_P", phy2log_P)
        object.__setattr__(self, "count_E", count_E)
        object.__setattr__(self, "slots_EC", slots_EC)
        object.__setattr__(self, "primary_P", torch.zeros_like(phy2log_P, dtype=torch.bool).index_fill_(
            0, slots_EC[:, 0], True))

    @property
    def n_slots(self) -> int:
        return self.phy2log_P.numel()

    @property
    def slots_per_rank(self) -> int:
        return self.n_slots // self.n_ranks

    def local(self, rank: int) -> torch.Tensor:
        """Logical expert of each of ``rank``'s slots."""
        S = self.slots_per_rank
        return self.phy2log_P[rank * S:(rank + 1) * S]

    def slots(self, expert_TK: torch.Tensor, keep_TK: torch.Tensor, rank: int) -> torch.Tensor:
        """The slot of every pair ``(t, expert_TK[t, k])``, as the module docstring chooses it for the kept pairs
        of sending rank ``rank`` (a dropped pair gets its expert's first slot; it is sent nowhere)."""
        device = expert_TK.device
        slots_EC, count_E = self.slots_EC.to(device), self.count_E.to(device)
        if slots_EC.shape[1] == 1:
            return slots_EC[expert_TK, 0]
        E = self.n_experts
        key_P = torch.where(keep_TK, expert_TK, E).flatten()  # dropped pairs: a bucket of their own
        order_P = torch.argsort(key_P, stable=True)
        sorted_P = key_P[order_P]
        ordinal_P = torch.empty_like(key_P)
        ordinal_P[order_P] = torch.arange(key_P.numel(), device=device) - torch.searchsorted(sorted_P, sorted_P)
        expert_P = expert_TK.flatten()
        column_P = torch.where(key_P < E, (ordinal_P + rank) % count_E[expert_P], 0)
        return slots_EC[expert_P, column_P].view_as(expert_TK)

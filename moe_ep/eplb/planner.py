"""Where each expert goes: DeepSeek's hierarchical expert-parallel load balancer (EPLB), written anew.

``plan_placement(load, n_physical, n_groups, n_nodes, n_ranks)`` places ``E`` logical experts (their
routed tokens ``load``) in ``P = n_physical`` physical slots on ``n_ranks`` ranks of ``n_nodes`` nodes,
``P / n_ranks`` slots per rank, rank-major: rank r holds slots ``[r P / n_ranks, (r + 1) P / n_ranks)``,
node m the ranks ``[m n_ranks / n_nodes, (m + 1) n_ranks / n_nodes)``. A logical expert held by c slots
(replicas) is assumed to split its load evenly, c ways, so the load of rank r is

    load_r = sum over the slots s of r of  load[phy2log[s]] / c[phy2log[s]]            (``rank_loads``)

and the plan tries to minimise ``max_r load_r`` in three steps (DeepSeek-V3 technical report §3.4 and
§3.5, "redundant experts"; the published algorithm is github.com/deepseek-ai/EPLB, ``eplb.py``, its
hierarchical policy):

1. **Groups to nodes.** The ``n_groups`` expert groups (contiguous blocks of ``E / n_groups`` ids) are
   packed to the nodes, ``n_groups / n_nodes`` per node, balancing the nodes' summed loads. A group never
   spans two nodes, so group-limited routing ("at most M nodes") keeps its meaning.
2. **Replicas inside each node.** Each node has ``P / n_nodes`` slots for its ``E / n_nodes`` experts; the
   extra slots go one at a time to the expert of the node with the largest load per replica
   ``load_e / c_e`` (which minimises the largest per-replica load), at most one replica per rank of the
   node while another expert has fewer (our addition: a second replica on a rank splits no rank's
   load). Replicas never leave their node.
3. **Replicas to ranks.** The node's replicas (weight ``load_e / c_e``) are packed to the node's ranks,
   ``P / n_ranks`` each, balancing the ranks' loads, two replicas of one expert on one rank avoided.

Packing (steps 1 and 3) is ``balanced_packs``: longest-processing-time greedy under equal pack sizes
(heaviest item first, into the lightest pack with room), then a local search of our own that swaps an
item of the heaviest pack with one of another pack while that lowers the larger of the two. Ties are
broken by index, so the plan is a deterministic function of ``load``: computed on every rank from the
same all-reduced counts, it is the same plan everywhere without communication. Every logical expert
gets at least one slot.
"""
from __future__ import annotations

import heapq
from collections import Counter
from typing import Optional, Sequence, Union

import torch

LoadLike = Union[torch.Tensor, Sequence]


def _check_sizes(E: int, n_physical: int, n_groups: int, n_nodes: int, n_ranks: int) -> None:
    for name, value in (("n_physical", n_physical), ("n_groups", n_groups), ("n_nodes", n_nodes),
                        ("n_ranks", n_ranks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"plan_placement: {name} must be a positive int, got {value!r}")
    rules = ((E % n_groups == 0, f"{E} experts do not split into n_groups={n_groups} equal groups"),
             (n_groups % n_nodes == 0, f"n_groups={n_groups} groups do not split over n_nodes={n_nodes} nodes"),
             (n_ranks % n_nodes == 0, f"n_ranks={n_ranks} ranks do not split over n_nodes={n_nodes} nodes"),
             (n_physical % n_ranks == 0, f"n_physical={n_physical} slots do not split over n_ranks={n_ranks} ranks"),
             (n_physical >= E, f"n_physical={n_physical} slots cannot hold the {E} logical experts once each"))
    for ok, why in rules:
        if not ok:
            raise ValueError(f"plan_placement: {why}")


def _as_loads(load: LoadLike) -> torch.Tensor:
    """``load`` as float64 ``[L, E]`` on the CPU, after checking it is 1-D or 2-D, finite and non-negative."""
    load = torch.as_tensor(load)
    if load.dim() not in (1, 2) or load.shape[-1] == 0 or load.is_complex() or load.dtype == torch.bool:
        raise ValueError(f"plan_placement: load must be a real [E] or [L, E] tensor of routed tokens per expert, "
                         f"got {load.dtype} of shape {tuple(load.shape)}")
    load_LE = load.detach().to("cpu", torch.float64).reshape(-1, load.shape[-1])
    if not torch.isfinite(load_LE).all() or (load_LE < 0).any():
        raise ValueError("plan_placement: load must be finite and non-negative")
    return load_LE


def balanced_packs(weights: Sequence[float], n_packs: int, labels: Optional[Sequence[int]] = None) -> list[list[int]]:
    """``n_packs`` lists of item indices, ``len(weights) / n_packs`` items each, with balanced weight sums.

    Greedy (heaviest item first, into the lightest pack with room; with ``labels``, a pack that holds no
    item of the same label if one has room), then swaps between the heaviest pack and another while one
    lowers the larger of the two sums (module docstring). Deterministic: ties go to the lower index. The
    packs come in the order of their lowest index, so with one item per pack item i stays in pack i, and
    otherwise low ids tend to stay in low packs (fewer rows move between plans).
    """
    n = len(weights)
    size = n // n_packs
    packs: list[list[int]] = [[] for _ in range(n_packs)]
    sums = [0.0] * n_packs
    for i in sorted(range(n), key=lambda i: (-weights[i], i)):
        open_ = [p for p in range(n_packs) if len(packs[p]) < size]
        if labels is not None:
            fresh = [p for p in open_ if all(labels[j] != labels[i] for j in packs[p])]
            open_ = fresh or open_
        best = min(open_, key=lambda p: (sums[p], p))
        packs[best].append(i)
        sums[best] += weights[i]
    _improve_by_swaps(packs, sums, weights, labels)
    return sorted((sorted(pack) for pack in packs), key=lambda pack: pack[0] if pack else n)


def _improve_by_swaps(packs: list[list[int]], sums: list[float], weights: Sequence[float],
                      labels: Optional[Sequence[int]]) -> None:
    """Swap items between the heaviest pack and another while the swap lowers the larger of their sums."""
    held = [Counter(labels[j] for j in pack) for pack in packs] if labels is not None else None

    def clashes(item: int, pack: int, leaving: int) -> bool:
        """Moving ``item`` into ``pack`` in place of ``leaving`` puts two items of one label there."""
        return held is not None and held[pack][labels[item]] - (labels[leaving] == labels[item]) > 0

    for _ in range(4 * sum(len(p) for p in packs)):
        heavy = max(range(len(packs)), key=lambda p: (sums[p], -p))
        best = None  # (new larger sum, other pack, position in heavy, position in other)
        for other in range(len(packs)):
            if other == heavy:
                continue
            for a_pos, a in enumerate(packs[heavy]):
                for b_pos, b in enumerate(packs[other]):
                    moved = weights[a] - weights[b]
                    if moved <= 0 or clashes(b, heavy, a) or clashes(a, other, b):
                        continue
                    larger = max(sums[heavy] - moved, sums[other] + moved)
                    if best is None or larger < best[0]:
                        best = (larger, other, a_pos, b_pos)
        if best is None or best[0] >= sums[heavy] * (1 - 1e-12):
            return
        _, other, a_pos, b_pos = best
        a, b = packs[heavy][a_pos], packs[other][b_pos]
        packs[heavy][a_pos], packs[other][b_pos] = b, a
        if held is not None:
            held[heavy].update([labels[b]]), held[heavy].subtract([labels[a]])
            held[other].update([labels[a]]), held[other].subtract([labels[b]])
        sums[heavy] += weights[b] - weights[a]
        sums[other] += weights[a] - weights[b]


def replica_counts(weights: Sequence[float], n_slots: int, cap: int) -> list[int]:
    """Replicas per item for ``n_slots >= len(weights)`` slots: one each, then each extra slot to the item with
    the largest ``weight / replicas`` (lower index on ties), which minimises the largest per-replica weight.

    No item gets more than ``cap`` replicas (the ranks of a node: a second replica on one rank splits no
    rank's load) while another item is below it.
    """
    counts = [1] * len(weights)
    heap = [(-w, i) for i, w in enumerate(weights)] if cap > 1 else []
    heapq.heapify(heap)
    for _ in range(n_slots - len(weights)):
        if not heap:  # every item at the cap: the remaining slots by weight per replica alone
            cap = n_slots
            heap = [(-w / c, i) for i, (w, c) in enumerate(zip(weights, counts))]
            heapq.heapify(heap)
        _, i = heapq.heappop(heap)
        counts[i] += 1
        if counts[i] < cap:
            heapq.heappush(heap, (-weights[i] / counts[i], i))
    return counts


def _plan_layer(load_E: list[float], n_physical: int, n_groups: int, n_nodes: int, n_ranks: int) -> list[int]:
    E = len(load_E)
    per_group = E // n_groups
    group_load = [sum(load_E[g * per_group:(g + 1) * per_group]) for g in range(n_groups)]
    node_groups = balanced_packs(group_load, n_nodes)
    slots_per_node, ranks_per_node = n_physical // n_nodes, n_ranks // n_nodes
    phy2log: list[int] = []
    for groups in node_groups:
        experts = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        counts = replica_counts([load_E[e] for e in experts], slots_per_node, ranks_per_node)
        replica_expert = [e for e, c in zip(experts, counts) for _ in range(c)]
        replica_load = [load_E[e] / c for e, c in zip(experts, counts) for _ in range(c)]
        for pack in balanced_packs(replica_load, ranks_per_node, labels=replica_expert):
            phy2log += sorted(replica_expert[i] for i in pack)
    return phy2log


def plan_placement(load: LoadLike, n_physical: int, n_groups: int, n_nodes: int, n_ranks: int) -> torch.Tensor:
    """``phy2log``: the logical expert of every physical slot, int64, ``[L, n_physical]`` for ``load [L, E]``
    (``[n_physical]`` for ``load [E]``); module docstring.

    ``load``: routed tokens (any non-negative measure) per logical expert, per MoE layer. ``n_groups`` must
    divide E and be a multiple of ``n_nodes``; ``n_ranks`` a multiple of ``n_nodes``; ``n_physical`` a
    multiple of ``n_ranks`` and at least E. Slots of one rank are in ascending logical id.
    ``ValueError`` naming the argument otherwise.
    """
    load_LE = _as_loads(load)
    _check_sizes(load_LE.shape[1], n_physical, n_groups, n_nodes, n_ranks)
    phy2log_LP = torch.tensor([_plan_layer(row, n_physical, n_groups, n_nodes, n_ranks) for row in load_LE.tolist()],
                              dtype=torch.int64)
    return phy2log_LP if torch.as_tensor(load).dim() == 2 else phy2log_LP[0]


def rank_loads(load: LoadLike, phy2log: torch.Tensor, n_ranks: int) -> torch.Tensor:
    """float64 ``[L, n_ranks]`` (``[n_ranks]`` for 1-D inputs): each rank's load when every logical expert's
    load splits evenly over its slots (the module docstring's ``load_r``)."""
    load_LE = _as_loads(load)
    phy2log_LP = torch.as_tensor(phy2log).reshape(-1, torch.as_tensor(phy2log).shape[-1])
    if phy2log_LP.shape[0] != load_LE.shape[0] or phy2log_LP.shape[1] % n_ranks:
        raise ValueError(f"rank_loads: phy2log of shape {tuple(phy2log_LP.shape)} does not fit load of shape "
                         f"{tuple(load_LE.shape)} over {n_ranks} ranks")
    count_LE = torch.zeros_like(load_LE).scatter_add_(1, phy2log_LP, torch.ones_like(phy2log_LP, dtype=torch.float64))
    share_LP = (load_LE / count_LE.clamp_min(1)).gather(1, phy2log_LP)
    out = share_LP.view(share_LP.shape[0], n_ranks, -1).sum(-1)
    return out if torch.as_tensor(load).dim() == 2 else out[0]

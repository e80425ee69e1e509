"""Process groups of expert parallelism: world = data-parallel x expert-parallel.

The ranks form a ``DeviceMesh`` of shape ``(dp, node, local)``; ``node`` x
``local`` flattened is ``ep``. One EP group (consecutive ranks, the D devices
of the papers) spans ``nodes`` nodes of ``ep / nodes`` ranks each: EP rank
``r`` sits on node ``r // local`` with local index ``r % local``. One ``dp``
column is an expert-data-parallel group (ranks holding the same expert
shard); a ``node`` column the inter-node group (one rank per node, same local
index) and a ``local`` row the intra-node group (the ranks of one node), which
the two-hop dispatcher uses. Experts are placed contiguously: expert e lives on
EP rank ``e // (E / ep)``, so a routing group is exactly a device (or a node)
and "at most M devices" bounds real traffic.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .consistency import check_same_on_ranks
from .links import small_collective
from .timeout import DEFAULT_TIMEOUT, Timeout, as_timedelta, set_collective_timeout


@dataclass
class ParallelState:
    """Sizes, ranks and groups of one process; ``ParallelState()`` is single-process.

    ep_group: the expert-parallel group (``ep_size`` ranks).
    edp_group: the expert-data-parallel group (``dp_size`` ranks, same shard).
    world_group: every rank (``dp_size * ep_size``).
    nodes: nodes one EP group spans (node-limited routing groups).
    internode_group: the ``nodes`` ranks of this EP group with this rank's
        local index, one per node (None when not built from the mesh).
    intranode_group: the ``ep_size / nodes`` ranks of this rank's node.
    """

    ep_size: int = 1
    ep_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    nodes: int = 1
    ep_group: Optional[dist.ProcessGroup] = None
    edp_group: Optional[dist.ProcessGroup] = None
    world_group: Optional[dist.ProcessGroup] = None
    internode_group: Optional[dist.ProcessGroup] = None
    intranode_group: Optional[dist.ProcessGroup] = None
    mesh: Optional[object] = None

    @property
    def world_size(self) -> int:
        return self.ep_size * self.dp_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        """This process is global rank 0 (or the only process): the one that writes shared files and prints."""
        return not dist.is_initialized() or dist.get_rank() == 0

    @property
    def ranks_per_node(self) -> int:
        """EP ranks on one node (the size of the intra-node group)."""
        return self.ep_size // self.nodes

    @property
    def node_index(self) -> int:
        """Which of the EP group's nodes this rank is on (its rank in the inter-node group)."""
        return self.ep_rank // self.ranks_per_node

    @property
    def local_index(self) -> int:
        """This rank's index within its node (its rank in the intra-node group)."""
        return self.ep_rank % self.ranks_per_node

    def expert_range(self, n_experts: int) -> tuple[int, int]:
        """Global ids ``[first, last)`` of this rank's experts (contiguous placement)."""
        per_rank = n_experts // self.ep_size
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank

    def all_reduce_world(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce over every rank (no-op on one process); latency-bound under emulated links."""
        if self.world_size > 1:
            with small_collective("all_reduce"):
                dist.all_reduce(tensor, op=op, group=self.world_group)
        return tensor

    def all_gather_ep(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every EP rank's ``tensor`` (same shape on all), concatenated along dim 0; latency-bound under emulated links."""
        if self.ep_size == 1:
            return tensor.clone()
        out = tensor.new_empty(self.ep_size * tensor.shape[0], *tensor.shape[1:])
        with small_collective("all_gather"):
            dist.all_gather_single(out, tensor.contiguous(), group=self.ep_group)
        return out


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def nodes_per_ep_group(ep_size: int, ranks_per_node: int) -> int:
    """Nodes one EP group of consecutive ranks spans, for nodes of ``ranks_per_node`` ranks.

    An EP group must fill whole nodes (``ep_size`` a multiple of the node size)
    or fit inside one (the node size a multiple of ``ep_size``); otherwise a
    group straddles a node boundary and "at most M nodes" would not bound the
    inter-node traffic, so this raises ``ValueError`` (pass ``nodes`` explicitly
    to override).
    """
    if ep_size >= ranks_per_node:
        if ep_size % ranks_per_node:
            raise ValueError(f"an expert-parallel group of {ep_size} ranks does not fill whole nodes of "
                             f"{ranks_per_node} ranks (LOCAL_WORLD_SIZE); choose ep_size as a multiple of it, "
                             f"or pass nodes= explicitly")
        return ep_size // ranks_per_node
    if ranks_per_node % ep_size:
        raise ValueError(f"expert-parallel groups of {ep_size} ranks straddle nodes of {ranks_per_node} ranks "
                         f"(LOCAL_WORLD_SIZE); choose ep_size dividing it, or pass nodes= explicitly")
    return 1


def nodes_spanned(global_ranks: list[int], ranks_per_node: int) -> int:
    """Nodes an EP group spans, from its members' global ranks (in EP-rank order) and the ranks per node.

    Global rank g sits on node ``g // ranks_per_node``. moe_ep's node layout
    (EP rank r on the ``r // (ep / nodes)``-th node of the group: traffic
    counters, node-limited routing, two-hop dispatch) must describe the real
    one, so the group must be ``nodes`` equal blocks of consecutive EP ranks,
    one block per node; otherwise this raises ``ValueError``. Any rank order
    that builds EP groups from whole nodes or from parts of one node does
    (consecutive ranks, or DeepSpeed's strided ``use_data_before_expert_parallel_``).
    """
    node_R = [g // ranks_per_node for g in global_ranks]
    distinct = list(dict.fromkeys(node_R))
    per_node = len(node_R) // len(distinct)
    if len(node_R) % len(distinct) or node_R != [distinct[r // per_node] for r in range(len(node_R))]:
        raise ValueError(f"the expert-parallel group of global ranks {global_ranks} lies on nodes {node_R} "
                         f"({ranks_per_node} ranks per node): its ranks are not equal blocks of consecutive EP "
                         f"ranks per node, so moe_ep cannot tell inter- from intra-node traffic; pass nodes= "
                         f"explicitly or order the ranks by node")
    return len(distinct)


def init_expert_parallel(ep_size: Optional[int] = None, nodes: Optional[int] = None,
                         timeout: Timeout = DEFAULT_TIMEOUT) -> ParallelState:
    """Build the (dp, node, local) mesh (``ep`` = node x local) on the default process group.

    Initialises the default group from the torchrun environment when absent
    (NCCL with CUDA, gloo without). ``ep_size`` defaults to the world size.
    ``nodes`` (nodes spanned by one EP group, for node-limited routing)
    defaults to ``ep_size / LOCAL_WORLD_SIZE`` when the EP group is larger
    than one node, else 1; pass it to emulate nodes on one machine.
    ``timeout`` (a ``timedelta`` or seconds) bounds every later collective
    of the default group and of the mesh's groups (moe_ep/parallel/timeout.py).
    Every rank must pass the same ``ep_size`` and ``nodes``: they are compared
    first (one small all-gather) and a mismatch raises ``ValueError`` on every rank.
    """
    timeout = as_timedelta(timeout)
    if not dist.is_initialized():
        dist.init_process_group(backend=_default_backend(), timeout=timeout)
    set_collective_timeout(timeout, dist.group.WORLD)
    world = dist.get_world_size()
    ep_size = world if ep_size is None else ep_size
    check_same_on_ranks("init_expert_parallel", dict(world_size=world, ep_size=ep_size, nodes=nodes))
    if ep_size < 1 or world % ep_size != 0:
        raise ValueError(f"init_expert_parallel: ep_size={ep_size} does not divide the world size {world}")
    if nodes is None:
        nodes = nodes_per_ep_group(ep_size, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if nodes < 1 or ep_size % nodes != 0:
        raise ValueError(f"init_expert_parallel: nodes={nodes} does not divide ep_size={ep_size}")
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if _default_backend() == "nccl" else "cpu"
    dp_size = world // ep_size
    mesh = init_device_mesh(device_type, (dp_size, nodes, ep_size // nodes), mesh_dim_names=("dp", "node", "local"))
    mesh["node", "local"]._flatten("ep")
    set_collective_timeout(timeout, *(mesh.get_group(name) for name in ("ep", "dp", "node", "local")))
    rank = dist.get_rank()
    return ParallelState(ep_size=ep_size, ep_rank=rank % ep_size, dp_size=dp_size, dp_rank=rank // ep_size,
                         nodes=nodes, ep_group=mesh.get_group("ep"), edp_group=mesh.get_group("dp"),
                         world_group=dist.group.WORLD, internode_group=mesh.get_group("node"),
                         intranode_group=mesh.get_group("local"), mesh=mesh)

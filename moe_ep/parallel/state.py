"""Process groups of expert and pipeline parallelism: world = pipeline x data-parallel x expert-parallel.

The ranks form a ``DeviceMesh`` of shape ``(pp, dp, node, local)``; ``node``
x ``local`` flattened is ``ep``, and ``dp`` x ``ep`` of one pipeline stage
is that stage's world (``world_group``): the ranks holding the same layers,
over which the layers' statistics, losses and gradients are reduced. Every
pipeline stage has the same (dp, ep) layout; ``pp_group`` links the ranks of
one (dp, ep) coordinate, one per stage, in stage order. Global rank
``g = pp_rank * dp * ep + dp_rank * ep + ep_rank``. One EP group (consecutive ranks, the D devices
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
    world_group: every rank of this pipeline stage (``dp_size * ep_size``;
        every rank when ``pp_size`` is 1).
    pp_size, pp_rank, pp_group: the pipeline stages and this rank's (one rank
        per stage of this (dp, ep) coordinate; None without pipelining).
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
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: Optional[dist.ProcessGroup] = None

    @property
    def world_size(self) -> int:
        """Ranks of this pipeline stage (``dp_size * ep_size``): the data sources of one layer."""
        return self.ep_size * self.dp_size

    @property
    def distributed(self) -> bool:
        """More than one rank holds this stage's layers (their forwards and gradients are collective)."""
        return self.world_size > 1

    @property
    def data_rank(self) -> int:
        """This rank's data shard among the ``world_size`` of its stage (every stage reads the same shards)."""
        return self.dp_rank * self.ep_size + self.ep_rank

    @property
    def global_group(self) -> Optional[dist.ProcessGroup]:
        """Every rank of every stage (checkpoints, run-wide agreement); None for a one-process state, also one
        that a single rank of a larger job builds for work of its own (e.g. a conversion on rank 0)."""
        return dist.group.WORLD if dist.is_initialized() and self.world_size * self.pp_size > 1 else None

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
                         timeout: Timeout = DEFAULT_TIMEOUT, pp_size: int = 1) -> ParallelState:
    """Build the (pp, dp, node, local) mesh (``ep`` = node x local) on the default process group.

    Initialises the default group from the torchrun environment when absent
    (NCCL with CUDA, gloo without). ``pp_size``: pipeline stages (must divide
    the world size); ``ep_size`` defaults to the world size / ``pp_size``.
    ``nodes`` (nodes spanned by one EP group, for node-limited routing)
    defaults to ``ep_size / LOCAL_WORLD_SIZE`` when the EP group is larger
    than one node, else 1; pass it to emulate nodes on one machine.
    ``timeout`` (a ``timedelta`` or seconds) bounds every later collective
    of the default group and of the mesh's groups (moe_ep/parallel/timeout.py).
    Every rank must pass the same ``ep_size``, ``nodes`` and ``pp_size``: they
    are compared first (one small all-gather) and a mismatch raises
    ``ValueError`` on every rank.
    """
    timeout = as_timedelta(timeout)
    if not dist.is_initialized():
        dist.init_process_group(backend=_default_backend(), timeout=timeout)
    set_collective_timeout(timeout, dist.group.WORLD)
    total = dist.get_world_size()
    check_same_on_ranks("init_expert_parallel", dict(world_size=total, ep_size=ep_size, nodes=nodes,
                                                     pp_size=pp_size))
    if not isinstance(pp_size, int) or pp_size < 1 or total % pp_size:
        raise ValueError(f"init_expert_parallel: pp_size={pp_size} does not divide the world size {total}")
    world = total // pp_size  # ranks of one stage
    ep_size = world if ep_size is None else ep_size
    if ep_size < 1 or world % ep_size != 0:
        ranks = f"world size {total}" if pp_size == 1 else \
            f"{world} ranks of a pipeline stage (world size {total} / pp_size {pp_size})"
        raise ValueError(f"init_expert_parallel: ep_size={ep_size} does not divide the {ranks}")
    if nodes is None:
        nodes = nodes_per_ep_group(ep_size, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if nodes < 1 or ep_size % nodes != 0:
        raise ValueError(f"init_expert_parallel: nodes={nodes} does not divide ep_size={ep_size}")
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if _default_backend() == "nccl" else "cpu"
    dp_size = world // ep_size
    mesh = init_device_mesh(device_type, (pp_size, dp_size, nodes, ep_size // nodes),
                            mesh_dim_names=("pp", "dp", "node", "local"))
    mesh["node", "local"]._flatten("ep")
    names = ["ep", "dp", "node", "local"]
    if pp_size > 1:
        mesh["dp", "node", "local"]._flatten("stage")
        names += ["pp", "stage"]
    set_collective_timeout(timeout, *(mesh.get_group(name) for name in names))
    rank = dist.get_rank()
    stage_rank = rank % world
    return ParallelState(ep_size=ep_size, ep_rank=stage_rank % ep_size, dp_size=dp_size,
                         dp_rank=stage_rank // ep_size, nodes=nodes, ep_group=mesh.get_group("ep"),
                         edp_group=mesh.get_group("dp"),
                         world_group=mesh.get_group("stage") if pp_size > 1 else dist.group.WORLD,
                         internode_group=mesh.get_group("node"), intranode_group=mesh.get_group("local"),
                         mesh=mesh, pp_size=pp_size, pp_rank=rank // world,
                         pp_group=mesh.get_group("pp") if pp_size > 1 else None)

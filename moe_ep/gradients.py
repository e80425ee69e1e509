"""Gradient synchronisation and clipping for data x expert parallelism.

Placement: the parameters of an ``MoELayer``'s ``experts`` module
(``experts.w_in``, ``experts.w_out``) are sharded over the expert-parallel
group and replicated over ``edp_group``; every other parameter is replicated
on every rank.

Convention (DeepSpeed's, and the one of ``moe_ep/balance.py``): each rank
back-propagates its local loss (mean over its tokens, plus the auxiliary
loss whose gradient is ``world_size`` times the rank's share). Then

    replicated grad <- SUM over world_group / world_size
    expert grad     <- SUM over edp_group   / world_size

which is the gradient of the global loss (the mean of the ranks' losses):
an expert shard's local gradient already holds the contributions of every
token of its EP group (the all-to-all backward brings them back), so only
the ``dp_size`` replicas remain to be summed, and the division by the full
world size averages over the data sources.

Redundant experts (``MoEConfig.redundant_experts``, moe_ep/eplb/): the slots
holding one logical expert first sum their gradients over the EP group
(``eplb.gradients.sum_replica_gradients``), and norms count each logical
expert once.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from .eplb.gradients import counted_rows, sum_replica_gradients
from .layer import MoELayer
from .parallel.state import ParallelState

DEFAULT_BUCKET_BYTES = 16 << 20


def partition_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, expert) trainable parameters, each in ``model.parameters()`` order."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in expert_ids], [p for p in params if id(p) in expert_ids]


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> Iterator[list[nn.Parameter]]:
    """Consecutive runs of same-dtype, same-device parameters of at most ``bucket_bytes`` (or one)."""
    bucket, size = [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if bucket and (size + nbytes > bucket_bytes or p.dtype != bucket[0].dtype or p.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        yield bucket


def _reduce_mean(params: list[nn.Parameter], group: Optional[dist.ProcessGroup], group_size: int,
                 world_size: int, bucket_bytes: int) -> None:
    for bucket in _buckets(params, bucket_bytes):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        if group_size > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world_size)
        for p, chunk in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(chunk.view_as(p.grad))


def sync_gradients(model: nn.Module, parallel: ParallelState, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Turn each rank's local gradients into the global gradient (see the module docstring).

    Collective over the world: call it on every rank after ``backward``.
    Parameters without a gradient get zeros first, so every rank issues the
    same collectives. No-op on one process, but for the sum over replicated
    experts' slots (module docstring).
    """
    sum_replica_gradients(model)
    if not parallel.distributed:
        return
    replicated, experts = partition_parameters(model)
    for p in replicated + experts:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _reduce_mean(replicated, parallel.world_group, parallel.world_size, parallel.world_size, bucket_bytes)
    _reduce_mean(experts, parallel.edp_group, parallel.dp_size, parallel.world_size, bucket_bytes)


def _squared_norm(params: list[nn.Parameter], device: torch.device, rows: Optional[dict] = None) -> torch.Tensor:
    """Sum of the squared gradient norms; ``rows``: ``{id(p): bool rows}`` of parameters counted in part."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None:
            grad = p.grad[rows[id(p)]] if rows and id(p) in rows else p.grad
            total = total + torch.linalg.vector_norm(grad, dtype=torch.float64).pow(2)
    return total


def clip_gradients(model: nn.Module, parallel: ParallelState, max_norm: Optional[float],
                   pp_group: Optional[dist.ProcessGroup] = None,
                   uncounted: Iterable[nn.Parameter] = ()) -> torch.Tensor:
    """Scale gradients so the global L2 norm is at most ``max_norm``; return the norm before clipping.

    Call after ``sync_gradients``. The norm is over the whole (unsharded)
    model: replicated gradients are counted once and the expert shards'
    squared norms are summed over the expert-parallel group, and with
    ``pp_group`` (pipeline stages, one rank each) the stages' squared norms
    are summed too, so every rank computes the same norm and applies the same
    scale (no host sync). ``uncounted``: parameters clipped but not counted
    (a pipeline stage's copy of a tied weight that another stage counts).
    ``max_norm=None`` only measures.
    """
    replicated, experts = partition_parameters(model)
    device = next(model.parameters()).device
    expert_sq = _squared_norm(experts, device, counted_rows(model))  # replicated experts once
    if parallel.ep_size > 1:
        dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=parallel.ep_group)
    skip = {id(p) for p in uncounted}
    total_sq = _squared_norm([p for p in replicated if id(p) not in skip], device) + expert_sq
    if pp_group is not None:
        dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=pp_group)
    total = total_sq.sqrt()
    if max_norm is not None:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in replicated + experts:
            if p.grad is not None:
                p.grad.mul_(scale)
    return total.float()

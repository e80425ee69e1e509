"""Routing statistics of a forward pass and the layer's auxiliary loss.

Every global quantity comes from one SUM and one MAX all-reduce over the
world (all data- and expert-parallel ranks): loads per expert, first choices
per expert, tokens sent per device, token and sequence counts, processed
pairs, distinct devices per token and, with ``check_finite``, the NaN/Inf
counts of moe_ep/finite.py. Batch-scope losses use these global
counts with the local ``prob_sum`` (which keeps its gradient); sequence-scope
losses need no communication since a sequence never spans ranks.

Gradient convention (the one of data parallelism): each rank's
``aux_loss`` has the *value* of the loss over the global batch and the
*gradient* of ``world_size`` times this rank's share, so averaging gradients
over ranks (or summing expert gradients and dividing by the world size, as
DeepSpeed does) gives the gradient of the global loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import MoEConfig
from .losses import comm_balance_loss, device_balance_loss, expert_balance_loss, router_z_loss, switch_balance_loss
from .parallel.state import ParallelState
from .router import Routing, destination_hits


@dataclass
class RoutingStats:
    """Global routing statistics of the last forward (tensors, no host sync).

    tokens_per_expert: routed pairs per expert over the world, before dropping.
    routed_pairs / dropped_pairs: T*K over the world, and how many were dropped
        (from the senders' keep masks).
    processed_pairs: (token, expert) pairs the experts computed over the
        world, counted where they ran; ``processed + dropped == routed``
        unless a pair was lost.
    max_violation: (max load - mean load) / mean load.
    devices_per_token_mean / _max: distinct device groups a token reaches.
    traffic: per-rank dispatch message sizes (expert-parallel only).
    """

    tokens_per_expert: torch.Tensor
    routed_pairs: torch.Tensor
    dropped_pairs: torch.Tensor
    processed_pairs: torch.Tensor
    max_violation: torch.Tensor
    devices_per_token_mean: torch.Tensor
    devices_per_token_max: torch.Tensor
    traffic: dict

    def as_dict(self) -> dict:
        """Plain Python numbers (one host sync)."""
        out = {name: getattr(self, name).tolist() for name in
               ("tokens_per_expert", "routed_pairs", "dropped_pairs", "processed_pairs", "max_violation",
                "devices_per_token_mean", "devices_per_token_max")}
        out.update({k: v.tolist() if torch.is_tensor(v) else v for k, v in self.traffic.items()})
        return out


@dataclass
class GlobalCounts:
    load_E: torch.Tensor          # routed pairs per expert (float64, exact integers)
    top1_E: torch.Tensor          # tokens whose best expert is e
    sent_D: torch.Tensor          # tokens with at least one expert on device d
    tokens: torch.Tensor          # T over the world
    sequences: torch.Tensor       # sequences over the world
    kept_pairs: torch.Tensor
    processed_pairs: torch.Tensor
    devices_sum: torch.Tensor
    devices_max: torch.Tensor
    nonfinite_C: torch.Tensor     # NaN/Inf counts per check of moe_ep/finite.py (empty when unchecked)


def device_hits(topk_idx_TK: torch.Tensor, n_experts: int, n_devices: int) -> torch.Tensor:
    """Bool [T, D]: token t has at least one selected expert on device d."""
    return destination_hits(topk_idx_TK // (n_experts // n_devices), n_devices)


def global_counts(routing: Routing, keep_TK: torch.Tensor, processed_pairs: torch.Tensor, n_seq: int,
                  n_devices: int, parallel: ParallelState,
                  nonfinite_C: Optional[torch.Tensor] = None) -> GlobalCounts:
    """Reduce the routing counts over the world (one SUM, one MAX all-reduce).

    ``processed_pairs``: the pairs this rank's experts computed (the dispatcher's count).
    ``nonfinite_C``: this rank's NaN/Inf counts (``finite.count_nonfinite``),
    summed in the same all-reduce; every rank must pass one or none alike.
    """
    idx_TK = routing.topk_idx_TK
    T, K = idx_TK.shape
    E = routing.scores_TE.shape[-1]
    hit_TD = device_hits(idx_TK, E, n_devices)
    devices_T = hit_TD.sum(-1)
    f64 = dict(dtype=torch.float64, device=idx_TK.device)
    nonfinite_C = torch.zeros(0, **f64) if nonfinite_C is None else nonfinite_C.to(**f64)
    # scatter_add and full, not bincount and torch.tensor: on a GPU those read the host (sync-free layers, CUDA graphs)
    def per_expert(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(E, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids)).to(**f64)

    packed = torch.cat([
        per_expert(idx_TK.flatten()),
        per_expert(routing.scores_TE.detach().argmax(-1)) if T else torch.zeros(E, **f64),
        hit_TD.sum(0).to(**f64),
        torch.full((1,), T, **f64), torch.full((1,), n_seq, **f64),
        keep_TK.sum().reshape(1).to(**f64),
        processed_pairs.reshape(1).to(**f64),
        devices_T.sum().reshape(1).to(**f64),
        nonfinite_C,
    ])
    parallel.all_reduce_world(packed)
    devices_max = (devices_T.max() if T else torch.zeros((), dtype=torch.long, device=idx_TK.device)).to(**f64)
    parallel.all_reduce_world(devices_max, op=torch.distributed.ReduceOp.MAX)
    load, top1, sent, rest, nonfinite = packed.split([E, E, n_devices, 5, nonfinite_C.numel()])
    return GlobalCounts(load, top1, sent, rest[0], rest[1], rest[2], rest[3], rest[4], devices_max, nonfinite)


def routing_stats(counts: GlobalCounts, top_k: int, traffic: dict) -> RoutingStats:
    mean_load = counts.load_E.mean().clamp_min(1e-9)
    routed = counts.tokens * top_k
    return RoutingStats(
        tokens_per_expert=counts.load_E.to(torch.long),
        routed_pairs=routed.to(torch.long),
        dropped_pairs=(routed - counts.kept_pairs).to(torch.long),
        processed_pairs=counts.processed_pairs.to(torch.long),
        max_violation=((counts.load_E.max() - mean_load) / mean_load).float(),
        devices_per_token_mean=(counts.devices_sum / counts.tokens.clamp_min(1)).float(),
        devices_per_token_max=counts.devices_max.to(torch.long),
        traffic=traffic,
    )


def _units(seq_id_T: torch.Tensor, n_seq: int, values_TX: torch.Tensor) -> torch.Tensor:
    """Sum rows of ``values_TX`` per sequence: ``[n_seq, X]``."""
    out = values_TX.new_zeros(n_seq, values_TX.shape[-1])
    return out.index_add_(0, seq_id_T, values_TX)


def aux_loss(routing: Routing, seq_id_T: torch.Tensor, n_seq: int, counts: GlobalCounts, config: MoEConfig,
             n_devices: int, device_limit: int, parallel: ParallelState) -> Optional[torch.Tensor]:
    """Sum of the enabled balance losses times their coefficients (None if none is enabled).

    Each loss is averaged over its units (sequences of the global batch, or
    the one global batch). See the module docstring for the gradient scale.
    """
    cfg = config
    terms = [cfg.expert_balance_coef, cfg.device_balance_coef, cfg.comm_balance_coef, cfg.switch_coef]
    if not any(terms) and not cfg.seq_balance_coef and not cfg.z_loss_coef:
        return None
    scores_TE = routing.scores_TE
    idx_TK = routing.topk_idx_TK
    T, K = idx_TK.shape
    E = scores_TE.shape[-1]
    dtype = scores_TE.dtype
    contrib = scores_TE.new_zeros(())

    def per_sequence(values_TX: torch.Tensor) -> torch.Tensor:
        return _units(seq_id_T, n_seq, values_TX)

    def tokens_per_sequence() -> torch.Tensor:
        # counted in int64: inductor's CPU code generator (torch 2.13) fails on a float index_add of constant
        # ones over the computed sequence ids (a compiled sync-free layer); an int64 one falls back to aten
        return per_sequence(torch.ones(T, 1, dtype=torch.long, device=scores_TE.device)).squeeze(-1).to(dtype)

    one_hot_TE = torch.zeros(T, E, dtype=dtype, device=scores_TE.device).scatter_(1, idx_TK, 1.0)
    if any(terms):
        if cfg.loss_scope == "batch":
            count_UE = counts.load_E.to(dtype).unsqueeze(0)
            top1_UE = counts.top1_E.to(dtype).unsqueeze(0)
            sent_UD = counts.sent_D.to(dtype).unsqueeze(0)
            prob_UE = scores_TE.sum(0, keepdim=True)
            tokens_U = counts.tokens.to(dtype).reshape(1)
            n_units = torch.ones((), dtype=dtype, device=scores_TE.device)
        else:
            count_UE = per_sequence(one_hot_TE)
            top1_UE = per_sequence(torch.zeros_like(one_hot_TE).scatter_(1, scores_TE.detach().argmax(-1, keepdim=True), 1.0))
            sent_UD = per_sequence(device_hits(idx_TK, E, n_devices).to(dtype))
            prob_UE = per_sequence(scores_TE)
            tokens_U = tokens_per_sequence()
            n_units = counts.sequences.to(dtype).clamp_min(1)
        total_U = scores_TE.new_zeros(count_UE.shape[0])
        if cfg.expert_balance_coef:
            total_U = total_U + cfg.expert_balance_coef * expert_balance_loss(count_UE, prob_UE, tokens_U, K)
        if cfg.device_balance_coef:
            total_U = total_U + cfg.device_balance_coef * device_balance_loss(count_UE, prob_UE, tokens_U, K,
                                                                              n_devices)
        if cfg.comm_balance_coef:
            total_U = total_U + cfg.comm_balance_coef * comm_balance_loss(sent_UD, prob_UE, tokens_U, device_limit)
        if cfg.switch_coef:
            total_U = total_U + cfg.switch_coef * switch_balance_loss(top1_UE, prob_UE, tokens_U)
        contrib = contrib + total_U.sum() / n_units
    if cfg.seq_balance_coef:
        normalised_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        seq_U = expert_balance_loss(per_sequence(one_hot_TE), per_sequence(normalised_TE),
                                    tokens_per_sequence(), K)
        contrib = contrib + cfg.seq_balance_coef * seq_U.sum() / counts.sequences.to(dtype).clamp_min(1)
    if cfg.z_loss_coef:
        contrib = contrib + cfg.z_loss_coef * router_z_loss(routing.logits_TE) / counts.tokens.clamp_min(1).to(dtype)
    if not parallel.distributed:
        return contrib
    total = parallel.all_reduce_world(contrib.detach().clone())
    return total + parallel.world_size * (contrib - contrib.detach())

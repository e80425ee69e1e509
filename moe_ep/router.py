"""Token-to-expert routing: scores, group-limited top-K, gate values.

One function, ``select_experts``, implements every routing option of the
config (docs/routing.md has the formulas and their sources):

    s_TE   = softmax(u W^T) | sigmoid(u W^T)              (router dtype, fp32)
    c_TE   = s_TE + b_E   (V3 aux-free bias, selection only; b is a buffer)
    group score  = max_{e in g} c            (device_limited, V2)
                 | sum of top n c in g       (node_limited, V3; n = group_score_topk, default K/M)
    c[e not in the M best groups] = -inf
    idx_TK = topk(c, K)
    g_TK   = s.gather(idx)                   (unbiased affinities)
    g_TK  /= sum_k g_TK                      (norm_topk_prob)
    g_TK  *= routed_scaling_factor

A routing replay (``moe_ep.replay``) supplies idx_TK instead of the top-K
step; the gate values are computed from the live scores all the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import MoEConfig


@dataclass
class Routing:
    """What the router decided for T tokens (K = num_experts_per_tok).

    logits_TE: router logits (router dtype), for the z-loss.
    scores_TE: affinities s (softmax or sigmoid), differentiable.
    topk_idx_TK: selected expert ids (int64).
    topk_weight_TK: gate values g (router dtype), differentiable.
    """

    logits_TE: torch.Tensor
    scores_TE: torch.Tensor
    topk_idx_TK: torch.Tensor
    topk_weight_TK: torch.Tensor


def destination_hits(dest_TK: torch.Tensor, n_dest: int) -> torch.Tensor:
    """Bool ``[T, n_dest]``: token t has a slot bound for destination d (slots with ``dest = n_dest`` go nowhere).

    With ``dest = expert // (E / D)`` the destinations are the D device groups
    (or ranks, or nodes) holding contiguous blocks of experts.
    """
    hit_TD = torch.zeros(dest_TK.shape[0], n_dest + 1, dtype=torch.bool, device=dest_TK.device)
    return hit_TD.scatter_(1, dest_TK, True)[:, :n_dest]


def group_limited_mask(choice_TE: torch.Tensor, n_group: int, topk_group: int, method: str,
                       group_score_k: int) -> torch.Tensor:
    """Boolean mask [T, E] of experts inside each token's ``topk_group`` best groups.

    Groups are contiguous blocks of E / n_group expert ids. ``device_limited``
    ranks a group by its best expert (V2); ``node_limited`` by the sum of its
    top ``group_score_k`` choice scores (V3: ``MoEConfig.group_score_k``).
    """
    T, E = choice_TE.shape
    per_group = E // n_group
    grouped_TGe = choice_TE.view(T, n_group, per_group)
    if method == "device_limited":
        group_score_TG = grouped_TGe.amax(dim=-1)
    elif method == "node_limited":
        group_score_TG = grouped_TGe.topk(group_score_k, dim=-1).values.sum(dim=-1)
    else:
        raise ValueError(f"group_limited_mask: unknown method {method!r}")
    keep_TM = group_score_TG.topk(topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, keep_TM, True)
    return keep_TG.repeat_interleave(per_group, dim=1)


@torch.no_grad()
def choose_experts(scores_TE: torch.Tensor, config: MoEConfig, bias_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``idx_TK``: the top-K of ``c = s + b`` inside each token's allowed groups (module docstring); no gradient."""
    choice_TE = scores_TE.detach()
    if bias_E is not None:
        choice_TE = choice_TE + bias_E.to(choice_TE.dtype)
    if config.topk_method != "greedy" and config.n_group > 1:
        allowed_TE = group_limited_mask(choice_TE, config.n_group, config.topk_group,
                                        config.topk_method, config.group_score_k)
        choice_TE = choice_TE.masked_fill(~allowed_TE, float("-inf"))
    return choice_TE.topk(config.num_experts_per_tok, dim=-1).indices


def select_experts(logits_TE: torch.Tensor, config: MoEConfig, bias_E: Optional[torch.Tensor] = None,
                   topk_idx_TK: Optional[torch.Tensor] = None) -> Routing:
    """Apply the config's routing to router logits; see the module docstring.

    ``topk_idx_TK`` (int64 ``[T, K]``, a routing replay: ``moe_ep.replay``): these experts instead of
    ``choose_experts``' choice; the gate values are still ``s.gather(idx)`` of these logits, normalised and scaled as
    configured, so the router keeps its gradient.
    """
    if config.scoring_func == "softmax":
        scores_TE = logits_TE.softmax(dim=-1)
    else:
        scores_TE = logits_TE.sigmoid()
    if topk_idx_TK is None:
        topk_idx_TK = choose_experts(scores_TE, config, bias_E)
    topk_weight_TK = scores_TE.gather(1, topk_idx_TK)
    if config.norm_topk_prob:
        topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    topk_weight_TK = topk_weight_TK * config.routed_scaling_factor
    return Routing(logits_TE, scores_TE, topk_idx_TK, topk_weight_TK)


class Router(nn.Module):
    """Linear gate ``W [N_r, H]`` plus the optional V3 selection bias.

    ``e_score_correction_bias`` (the transformers name) is a buffer: it moves
    only through ``update_bias`` and never receives a gradient.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size,
                                               dtype=config.torch_router_dtype))
        if config.aux_free_bias:
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(config.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        nn.init.normal_(self.weight, std=config.hidden_size ** -0.5)

    def _apply(self, fn, recurse=True):
        # Casting the module (.to(dtype), .bfloat16(), ...) leaves the bias in fp32: gamma-sized steps need it.
        out = super()._apply(fn, recurse)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return out

    def forward(self, x_TH: torch.Tensor, topk_idx_TK: Optional[torch.Tensor] = None) -> Routing:
        """The routing of ``x_TH``; ``topk_idx_TK``: replayed experts (``select_experts``)."""
        cfg = self.config
        x_TH = x_TH.to(cfg.torch_router_dtype)
        if self.training and cfg.router_jitter > 0:
            noise = torch.empty_like(x_TH).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
            x_TH = x_TH * noise
        logits_TE = torch.nn.functional.linear(x_TH, self.weight.to(cfg.torch_router_dtype))
        return select_experts(logits_TE, cfg, self.e_score_correction_bias, topk_idx_TK)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """V3 aux-free step: ``b += gamma * sign(mean(load) - load)`` (global loads)."""
        if self.e_score_correction_bias is None:
            raise RuntimeError("Router.update_bias: the config has aux_free_bias=False")
        load_E = load_E.to(torch.float32)
        self.e_score_correction_bias += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)

"""Balance losses, written over per-unit routing statistics.

A *unit* is the span a paper's T counts: one sequence (DeepSeekMoE, V2, V3's
sequence-wise loss) or the whole batch. Every loss below returns one value
per unit, ``L_U``; the layer averages units and multiplies by the
coefficient. Statistics per unit u (E = routed experts, K = top-k):

    count_UE[u, i]  = sum_{t in u} 1(token t selects expert i)
    prob_sum_UE[u,i]= sum_{t in u} s_{i,t}
    tokens_U[u]     = T_u

Writing the losses over sums keeps them linear in ``prob_sum``: under expert
parallelism the counts (and T) are all-reduced while each rank keeps the
gradient of its own ``prob_sum``, and the per-rank values add up to the loss
of the concatenated batch.
"""
from __future__ import annotations

import torch


def _per_token(sum_UE: torch.Tensor, tokens_U: torch.Tensor) -> torch.Tensor:
    return sum_UE / tokens_U.clamp_min(1).unsqueeze(-1).to(sum_UE.dtype)


def expert_balance_loss(count_UE: torch.Tensor, prob_sum_UE: torch.Tensor, tokens_U: torch.Tensor,
                        top_k: int) -> torch.Tensor:
    """DeepSeekMoE / V2 expert-level loss (without alpha_1), per unit.

        L = sum_i f_i P_i,  f_i = N'/(K' T) sum_t 1(t selects i),  P_i = (1/T) sum_t s_{i,t}

    With V3's renormalised scores s' = s / sum_j s_j in ``prob_sum_UE`` this is
    the V3 complementary sequence-wise loss (Eq. 17-20).
    """
    n_experts = count_UE.shape[-1]
    f_UE = _per_token(count_UE, tokens_U) * (n_experts / top_k)
    P_UE = _per_token(prob_sum_UE, tokens_U)
    return (f_UE.to(P_UE.dtype) * P_UE).sum(-1)


def device_balance_loss(count_UE: torch.Tensor, prob_sum_UE: torch.Tensor, tokens_U: torch.Tensor,
                        top_k: int, n_devices: int) -> torch.Tensor:
    """DeepSeekMoE / V2 device-level loss (without alpha_2), per unit.

        L = sum_{d=1..D} f'_d P'_d,  f'_d = (1/|E_d|) sum_{j in E_d} f_j,  P'_d = sum_{j in E_d} P_j

    with f_j, P_j of the expert-level loss and E_d the contiguous block of
    experts on device d.
    """
    U, E = count_UE.shape
    f_UE = _per_token(count_UE, tokens_U) * (E / top_k)
    P_UE = _per_token(prob_sum_UE, tokens_U)
    f_dev_UD = f_UE.view(U, n_devices, E // n_devices).mean(-1)
    P_dev_UD = P_UE.view(U, n_devices, E // n_devices).sum(-1)
    return (f_dev_UD.to(P_dev_UD.dtype) * P_dev_UD).sum(-1)


def comm_balance_loss(sent_UD: torch.Tensor, prob_sum_UE: torch.Tensor, tokens_U: torch.Tensor,
                      device_limit: int) -> torch.Tensor:
    """V2 communication balance loss (without alpha_3), per unit.

        L = sum_{d=1..D} f''_d P''_d,  f''_d = D/(M T) sum_t 1(t is sent to device d),
        P''_d = sum_{j in E_d} P_j

    ``sent_UD[u, d]`` counts the tokens of u with at least one expert on d.
    """
    U, D = sent_UD.shape
    E = prob_sum_UE.shape[-1]
    f_UD = _per_token(sent_UD, tokens_U) * (D / device_limit)
    P_UD = _per_token(prob_sum_UE, tokens_U).view(U, D, E // D).sum(-1)
    return (f_UD.to(P_UD.dtype) * P_UD).sum(-1)


def switch_balance_loss(top1_count_UE: torch.Tensor, prob_sum_UE: torch.Tensor,
                        tokens_U: torch.Tensor) -> torch.Tensor:
    """Switch / GShard load-balancing loss (without alpha), per unit.

        L = N sum_i f_i P_i,  f_i = (1/T) sum_t 1(argmax_j s_{j,t} = i),  P_i = (1/T) sum_t s_{i,t}

    GShard's ``mean_e(c_e/S * m_e) * E^2`` is the same quantity (first choices
    only); equal to 1 under uniform routing.
    """
    n_experts = top1_count_UE.shape[-1]
    f_UE = _per_token(top1_count_UE, tokens_U)
    P_UE = _per_token(prob_sum_UE, tokens_U)
    return n_experts * (f_UE.to(P_UE.dtype) * P_UE).sum(-1)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE), summed over tokens (divide by T for the mean).

        L = sum_t (log sum_i exp(x_{i,t}))^2
    """
    # At least fp32 (bf16 logits are upcast; fp64 logits keep their precision).
    logits_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
    return torch.logsumexp(logits_TE, dim=-1).square().sum()

"""Routing: device-limited (V2) and node-limited (V3) group selection, gate values, the V3 bias."""
import pytest
import torch

from moe_ep import MoEConfig, MoELayer
from moe_ep.router import Router, select_experts

pytestmark = pytest.mark.timeout(120)


def _cfg(**kw):
    base = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2)
    return MoEConfig(**{**base, **kw})


def _logit(p):
    """Inverse sigmoid, so hand-written sigmoid scores can be fed as logits."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p))


def _brute_allowed_groups(choice_E, n_group, topk_group, group_score):
    """Indices of the topk_group best groups of one token, by a Python loop."""
    per = len(choice_E) // n_group
    scores = []
    for g in range(n_group):
        members = [float(choice_E[g * per + j]) for j in range(per)]
        scores.append(group_score(members))
    return set(sorted(range(n_group), key=lambda g: -scores[g])[:topk_group])


def _max_score(members):
    return max(members)


def _top_sum(width):
    return lambda members: sum(sorted(members, reverse=True)[:width])


# -------------------------------------------------------------- device-limited
def test_device_limited_hand_built_case_differs_from_greedy():
    # Groups {0,1} {2,3} {4,5} {6,7}; group maxes 5, 4.9, 4.8, 4.7 -> keep groups 0 and 1.
    logits = torch.tensor([[5.0, 1.0, 4.9, 0.5, 4.8, 0.0, 4.7, 0.0]])
    limited = select_experts(logits, _cfg(num_experts_per_tok=3, topk_method="device_limited", n_group=4,
                                          topk_group=2))
    greedy = select_experts(logits, _cfg(num_experts_per_tok=3, n_group=4, topk_group=2))
    assert set(limited.topk_idx_TK[0].tolist()) == {0, 2, 1}
    assert set(greedy.topk_idx_TK[0].tolist()) == {0, 2, 4}


def test_device_limited_ranks_groups_by_their_best_expert_not_the_sum():
    # Group 0 = {5, 0} (max 5, sum 5); group 1 = {4.5, 4.5} (max 4.5, sum 9). M = 1.
    logits = torch.tensor([[5.0, 0.0, 4.5, 4.5, -1.0, -1.0, -1.0, -1.0]])
    r = select_experts(logits, _cfg(topk_method="device_limited", n_group=4, topk_group=1))
    assert set(r.topk_idx_TK[0].tolist()) == {0, 1}


def test_device_limited_never_leaves_the_m_best_groups_random():
    E, G, M, K = 16, 4, 2, 3
    cfg = _cfg(n_routed_experts=E, num_experts_per_tok=K, topk_method="device_limited", n_group=G, topk_group=M)
    logits = torch.randn(256, E) * 3
    r = select_experts(logits, cfg)
    greedy = select_experts(logits, cfg.replace(topk_method="greedy"))
    scores = logits.softmax(-1)
    left_greedy = 0
    for t in range(logits.shape[0]):
        allowed = _brute_allowed_groups(scores[t], G, M, _max_score)
        chosen = r.topk_idx_TK[t].tolist()
        assert {e // (E // G) for e in chosen} <= allowed
        # and they are the K best experts inside the allowed groups
        inside = sorted((e for e in range(E) if e // (E // G) in allowed), key=lambda e: -float(scores[t, e]))
        assert set(chosen) == set(inside[:K])
        left_greedy += not {e // (E // G) for e in greedy.topk_idx_TK[t].tolist()} <= allowed
    assert left_greedy > 0  # the limit is binding for some tokens, so the check above has teeth


# ---------------------------------------------------------------- node-limited
V3_KW = dict(n_routed_experts=16, num_experts_per_tok=4, scoring_func="sigmoid", topk_method="node_limited",
             n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, aux_free_bias=True)


def test_node_limited_group_score_is_sum_of_top_k_over_m_biased_scores():
    cfg = _cfg(**V3_KW)  # K / M = 2
    # Wanted biased scores c = s + b, group by group (4 experts each):
    choice = torch.tensor([[0.90, 0.10, 0.10, 0.10,    # top-2 sum 1.00, max 0.90, sum 1.20
                            0.60, 0.60, 0.00, 0.00,    # top-2 sum 1.20, max 0.60, sum 1.20
                            0.56, 0.55, 0.54, 0.53,    # top-2 sum 1.11, max 0.56, sum 2.18
                            0.30, 0.30, 0.30, 0.30]],  # top-2 sum 0.60
                          dtype=torch.float64)
    logits = torch.randn(1, 16, dtype=torch.float64)
    bias = choice[0] - logits[0].sigmoid()
    r = select_experts(logits, cfg, bias)
    # Top-2 sums keep groups 1 and 2 (max would keep 0 and 1; full sums would keep group 2 first).
    assert set(r.topk_idx_TK[0].tolist()) == {4, 5, 8, 9}


def test_node_limited_masks_with_minus_inf_so_negative_biased_scores_stay_in_allowed_groups():
    cfg = _cfg(**V3_KW)
    T, E, G, M, K = 256, 16, 4, 2, 4
    logits = torch.randn(T, E)
    bias = -2.0 + 0.5 * torch.randn(E)  # s + b < 0 for every expert
    r = select_experts(logits, cfg, bias)
    choice = logits.sigmoid() + bias
    assert (choice < 0).all()
    zero_masking_escapes = 0
    for t in range(T):
        allowed = _brute_allowed_groups(choice[t], G, M, _top_sum(K // M))
        chosen = r.topk_idx_TK[t].tolist()
        assert {e // (E // G) for e in chosen} <= allowed
        inside = sorted((e for e in range(E) if e // (E // G) in allowed), key=lambda e: -float(choice[t, e]))
        assert set(chosen) == set(inside[:K])
        # transformers' 0.0 masking would pick a disallowed expert here (0 > negative score).
        masked0 = torch.tensor([float(choice[t, e]) if e // (E // G) in allowed else 0.0 for e in range(E)])
        zero_masking_escapes += not {e // (E // G) for e in masked0.topk(K).indices.tolist()} <= allowed
    assert zero_masking_escapes == T


def test_node_limited_groups_chosen_on_biased_scores():
    cfg = _cfg(**V3_KW)
    T, E, G, M = 128, 16, 4, 2
    logits = torch.randn(T, E)
    bias = torch.zeros(E)
    bias[12:] = 0.6  # pushes group 3 into every token's kept groups
    r = select_experts(logits, cfg, bias)
    chosen_groups = r.topk_idx_TK // (E // G)
    assert (chosen_groups == 3).any(-1).all()
    unbiased_allowed = [_brute_allowed_groups(logits[t].sigmoid(), G, M, _top_sum(2)) for t in range(T)]
    assert sum(3 not in a for a in unbiased_allowed) > 0  # the bias changed the group choice


def test_v3_gate_weights_come_from_unbiased_scores():
    cfg = _cfg(**V3_KW)
    logits = torch.randn(64, 16, dtype=torch.float64)
    bias = 0.3 * torch.randn(16, dtype=torch.float64)
    r = select_experts(logits, cfg, bias)
    s = logits.sigmoid()
    for t in range(64):
        idx = r.topk_idx_TK[t].tolist()
        total = sum(float(s[t, e]) for e in idx)
        for k, e in enumerate(idx):
            assert float(r.topk_weight_TK[t, k]) == pytest.approx(2.5 * float(s[t, e]) / total, rel=1e-12)
        biased_total = sum(float(s[t, e] + bias[e]) for e in idx)
        assert abs(float(r.topk_weight_TK[t, 0]) - 2.5 * float(s[t, idx[0]] + bias[idx[0]]) / biased_total) > 1e-9


def test_large_bias_attracts_every_token_but_not_the_weight():
    cfg = _cfg(**V3_KW)
    logits = torch.randn(32, 16)
    bias = torch.zeros(16)
    bias[7] = 10.0
    r = select_experts(logits, cfg, bias)
    assert (r.topk_idx_TK == 7).any(-1).all()
    assert (r.topk_weight_TK < 2.5).all()  # the +10 never reaches the gate value


# ----------------------------------------------------------- gate normalisation
def test_topk_normalisation_and_scaling_factor():
    logits = torch.randn(50, 8, dtype=torch.float64)
    s = logits.softmax(-1)
    raw = select_experts(logits, _cfg(num_experts_per_tok=3))
    assert torch.allclose(raw.topk_weight_TK, s.gather(1, raw.topk_idx_TK))
    assert torch.equal(raw.topk_idx_TK, s.topk(3, dim=-1).indices)  # greedy = plain top-k of s

    normed = select_experts(logits, _cfg(num_experts_per_tok=3, norm_topk_prob=True))
    assert torch.equal(normed.topk_idx_TK, raw.topk_idx_TK)
    assert torch.allclose(normed.topk_weight_TK.sum(-1), torch.ones(50, dtype=torch.float64))
    assert torch.allclose(normed.topk_weight_TK, raw.topk_weight_TK / raw.topk_weight_TK.sum(-1, keepdim=True))

    scaled = select_experts(logits, _cfg(num_experts_per_tok=3, routed_scaling_factor=16.0))
    assert torch.equal(scaled.topk_idx_TK, raw.topk_idx_TK)
    assert torch.allclose(scaled.topk_weight_TK, 16.0 * raw.topk_weight_TK)

    both = select_experts(logits, _cfg(num_experts_per_tok=3, norm_topk_prob=True, routed_scaling_factor=2.5))
    assert torch.allclose(both.topk_weight_TK.sum(-1), torch.full((50,), 2.5, dtype=torch.float64))


def test_router_scores_in_router_dtype_for_bf16_input():
    router = Router(_cfg())
    r = router(torch.randn(10, 16).bfloat16())
    assert r.logits_TE.dtype == torch.float32 and r.topk_weight_TK.dtype == torch.float32
    assert torch.allclose(r.scores_TE.sum(-1), torch.ones(10))


# ------------------------------------------------------------------ V3 bias
def test_bias_is_a_buffer_without_gradient():
    layer = MoELayer(_cfg(**V3_KW, seq_balance_coef=1e-2))
    bias = layer.router.e_score_correction_bias
    assert bias is not None and bias.dtype == torch.float32
    assert all(p is not bias for p in layer.parameters())
    assert "router.e_score_correction_bias" in dict(layer.named_buffers())
    assert "router.e_score_correction_bias" in layer.state_dict()
    assert not bias.requires_grad
    with torch.no_grad():
        bias.copy_(0.1 * torch.randn(16))
    y = layer(torch.randn(2, 6, 16))
    (y.square().sum() + layer.aux_loss).backward()
    assert bias.grad is None
    assert layer.router.weight.grad is not None
    assert MoELayer(_cfg()).router.e_score_correction_bias is None


def test_update_bias_follows_sign_of_mean_minus_load():
    cfg = _cfg(**V3_KW, bias_update_rate=0.01)
    layer = MoELayer(cfg).train()
    with torch.no_grad():
        layer.router.weight.mul_(4.0)  # a skewed router, so loads differ
        layer.router.e_score_correction_bias.copy_(0.05 * torch.randn(16))
    start = layer.router.e_score_correction_bias.clone()
    loads = torch.zeros(16, dtype=torch.float64)
    for _ in range(2):  # loads accumulate over the forwards of one step
        layer(torch.randn(3, 8, 16))
        loads += torch.tensor(layer.last_stats.as_dict()["tokens_per_expert"], dtype=torch.float64)
    assert loads.sum() == 2 * 3 * 8 * 4
    layer.update_bias()
    mean = float(loads.mean())
    for e in range(16):
        load = float(loads[e])
        sign = (mean > load) - (mean < load)
        expected = float(start[e]) + 0.01 * sign
        assert float(layer.router.e_score_correction_bias[e]) == pytest.approx(expected, abs=1e-7)
    assert (loads != mean).any()
    # The accumulator was reset: another update without a forward changes nothing.
    after = layer.router.e_score_correction_bias.clone()
    layer.update_bias()
    assert torch.equal(layer.router.e_score_correction_bias, after)


def test_eval_forwards_do_not_move_the_bias():
    layer = MoELayer(_cfg(**V3_KW)).eval()
    layer(torch.randn(4, 16))
    layer.update_bias()
    assert torch.count_nonzero(layer.router.e_score_correction_bias) == 0


def test_update_bias_without_bias():
    router = Router(_cfg())
    with pytest.raises(RuntimeError, match="aux_free_bias"):
        router.update_bias(torch.ones(8))
    layer = MoELayer(_cfg())
    layer(torch.randn(4, 16))
    layer.update_bias()  # no-op, no error

"""Token dropping: capacities, which pairs go, protected sequences, train/eval, and the layer output."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe_ep import MoEConfig, MoELayer
from moe_ep.dropping import DropRule, PairKeys, capacity, protected_sequences

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------ brute force
def brute_force_keep(idx_TK, affinity_TK, protected_T, E, D, expert_cf, device_cf, policy):
    """Keep mask [T][K] by explicit loops: expert capacity first, then device capacity.

    In a bucket, pairs are ranked protected first, then by priority (affinity:
    highest first; position: every first choice before any second choice, earlier
    tokens first), then by (token, slot). The first ``cap`` pairs and every
    protected pair are kept. Pairs dropped by the expert limit use no device budget.
    """
    T, K = len(idx_TK), len(idx_TK[0]) if idx_TK else 0
    keep = [[True] * K for _ in range(T)]

    def rank(pair):
        t, k = pair
        prio = -affinity_TK[t][k] if policy == "affinity" else 0.0
        order = (t, k) if policy == "affinity" else (k, t)
        return (0 if protected_T[t] else 1, prio, order)

    stages = []
    if expert_cf is not None:
        stages.append((math.ceil(expert_cf * T * K / E), lambda e: e))
    if device_cf is not None:
        stages.append((math.ceil(device_cf * T * K / D), lambda e: e // (E // D)))
    for cap, bucket_of in stages:
        buckets = {}
        for t in range(T):
            for k in range(K):
                if keep[t][k]:
                    buckets.setdefault(bucket_of(idx_TK[t][k]), []).append((t, k))
        for pairs in buckets.values():
            for position, (t, k) in enumerate(sorted(pairs, key=rank)):
                if position >= cap and not protected_T[t]:
                    keep[t][k] = False
    return keep


def _keys(idx_TK, affinity_TK, protected_T):
    T, K = idx_TK.shape
    return PairKeys(expert_P=idx_TK.flatten(), affinity_P=affinity_TK.flatten(),
                    protected_P=protected_T.repeat_interleave(K), token_P=torch.arange(T).repeat_interleave(K),
                    slot_P=torch.arange(K).repeat(T))


def _random_routing(T, E, K, skew=2.0):
    logits = torch.randn(T, E) + skew * torch.linspace(1, 0, E)  # low ids are popular
    scores = logits.softmax(-1)
    aff, idx = scores.topk(K, dim=-1)
    return idx, aff


# ------------------------------------------------------------- DropRule alone
@pytest.mark.parametrize("policy", ["affinity", "position"])
@pytest.mark.parametrize("expert_cf,device_cf", [(1.0, None), (None, 1.0), (1.25, 0.8), (0.5, None)])
def test_drop_rule_matches_brute_force(policy, expert_cf, device_cf):
    T, E, K, D = 40, 8, 2, 4
    idx, aff = _random_routing(T, E, K)
    protected = torch.zeros(T, dtype=torch.bool)
    protected[torch.randperm(T)[:4]] = True
    rule = DropRule(n_tokens=T, top_k=K, n_experts=E, n_devices=D, expert_cf=expert_cf, device_cf=device_cf,
                    policy=policy)
    keep = rule(_keys(idx, aff, protected)).view(T, K)
    want = brute_force_keep(idx.tolist(), aff.tolist(), protected.tolist(), E, D, expert_cf, device_cf, policy)
    assert keep.tolist() == want
    assert (~keep).any()  # the limits bind, so the comparison is not trivial
    assert keep[protected].all()


def test_lowest_affinity_pairs_are_dropped_per_device():
    T, E, K, D = 64, 8, 3, 4
    idx, aff = _random_routing(T, E, K, skew=3.0)
    none = torch.zeros(T, dtype=torch.bool)
    rule = DropRule(n_tokens=T, top_k=K, n_experts=E, n_devices=D, expert_cf=None, device_cf=1.0,
                    policy="affinity")
    keep = rule(_keys(idx, aff, none)).view(T, K)
    cap = capacity(1.0, T, K, D)
    assert cap == math.ceil(T * K / D)
    device = idx // (E // D)
    for d in range(D):
        in_d = device == d
        kept, dropped = aff[in_d & keep], aff[in_d & ~keep]
        assert kept.numel() == min(cap, int(in_d.sum()))
        if dropped.numel():
            assert kept.min() >= dropped.max()
    assert (~keep).sum() > 0


def test_position_policy_puts_first_choices_before_second_choices():
    # E = 4, K = 2, T = 4, cf = 0.5 -> capacity ceil(0.5 * 4 * 2 / 4) = 1 per expert.
    # Expert 0 receives token 0's *second* choice (high affinity) and token 3's *first* choice (low affinity).
    idx = torch.tensor([[1, 0], [2, 3], [3, 2], [0, 1]])
    aff = torch.tensor([[0.50, 0.45], [0.5, 0.4], [0.5, 0.4], [0.30, 0.20]])
    none = torch.zeros(4, dtype=torch.bool)
    position = DropRule(4, 2, 4, 1, expert_cf=0.5, device_cf=None, policy="position")(_keys(idx, aff, none)).view(4, 2)
    affinity = DropRule(4, 2, 4, 1, expert_cf=0.5, device_cf=None, policy="affinity")(_keys(idx, aff, none)).view(4, 2)
    assert position[3, 0] and not position[0, 1]  # GShard: the first choice wins the slot
    assert affinity[0, 1] and not affinity[3, 0]  # V2 / V-MoE: the higher affinity wins
    # Position order among first choices: the earlier token wins (expert 1: token 0 slot 0 vs token 3 slot 1).
    assert position[0, 0] and not position[3, 1]


def test_protected_sequences_count_rotation_and_agreement():
    B, frac = 20, 0.1
    n = math.floor(frac * B)
    seen = torch.zeros(B, dtype=torch.bool)
    for step in range(B // n):
        mask = protected_sequences(torch.arange(B), B, frac, step)
        assert int(mask.sum()) == n
        assert not (seen & mask).any()  # a new window every step until all were protected once
        seen |= mask
        # a rank holding a slice of the sequences agrees with the full view
        assert torch.equal(protected_sequences(torch.arange(5, 12), B, frac, step), mask[5:12])
    assert seen.all()
    assert not protected_sequences(torch.arange(4), 4, 0.1, 0).any()  # floor(0.4) = 0


# --------------------------------------------------------------------- layer
BASE = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1)


def _skewed_layer(cfg):
    layer = MoELayer(cfg)
    with torch.no_grad():  # popular low-id experts so the capacities bind
        layer.router.weight[: cfg.n_routed_experts // 4] += 0.6
    return layer


def _routing_of(layer, x_TH):
    with torch.no_grad():
        r = layer.router(x_TH)
    return r.topk_idx_TK, r.scores_TE.gather(1, r.topk_idx_TK), r.topk_weight_TK


def _hand_output(layer, x_TH, idx, weight, keep):
    """shared(x) + sum over kept pairs of g * SwiGLU_e(x), token by token."""
    out = []
    for t in range(x_TH.shape[0]):
        y = layer.shared_experts(x_TH[t]) if layer.shared_experts is not None else torch.zeros_like(x_TH[t])
        for k in range(idx.shape[1]):
            if keep[t][k]:
                e = int(idx[t, k])
                gate, up = (x_TH[t] @ layer.experts.w_in[e]).chunk(2, dim=-1)
                y = y + weight[t, k] * ((F.silu(gate) * up) @ layer.experts.w_out[e])
        out.append(y)
    return torch.stack(out)


def _expected(layer, x, train=True, cf=None):
    """(keep, hand-computed output) for the layer's next forward."""
    cfg = layer.config
    B, S, H = x.shape
    x_TH = x.reshape(-1, H)
    idx, aff, weight = _routing_of(layer, x_TH)
    if train:
        protected_B = protected_sequences(torch.arange(B), B, cfg.protected_seq_frac, int(layer.drop_step))
        expert_cf, device_cf = cfg.expert_capacity_factor, cfg.device_capacity_factor
    else:
        protected_B = torch.zeros(B, dtype=torch.bool)
        expert_cf = cf if cfg.expert_capacity_factor is not None else None
        device_cf = cf if cfg.device_capacity_factor is not None else None
    protected_T = protected_B.repeat_interleave(S)
    D = cfg.device_groups or cfg.n_group
    keep = brute_force_keep(idx.tolist(), aff.tolist(), protected_T.tolist(), cfg.n_routed_experts, D,
                            expert_cf, device_cf, cfg.drop_policy)
    with torch.no_grad():
        y = _hand_output(layer, x_TH, idx, weight, keep).view(B, S, H)
    return keep, y, protected_T


V2_DROP = dict(BASE, num_experts_per_tok=3, topk_method="device_limited", n_group=4, topk_group=2,
               device_capacity_factor=1.0, protected_seq_frac=0.25)
CASES = {
    "v2_device_capacity": V2_DROP,
    "expert_capacity_position": dict(BASE, expert_capacity_factor=0.75, drop_policy="position"),
    "expert_and_device_capacity": dict(V2_DROP, expert_capacity_factor=1.25, device_capacity_factor=0.75,
                                       protected_seq_frac=0.0),
    "v3_bias_expert_capacity": dict(BASE, num_experts_per_tok=4, scoring_func="sigmoid", topk_method="node_limited",
                                    n_group=4, topk_group=2, aux_free_bias=True, norm_topk_prob=True,
                                    expert_capacity_factor=1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_drops_exactly_the_brute_force_pairs(case):
    cfg = MoEConfig(**CASES[case])
    layer = _skewed_layer(cfg).train()
    if cfg.aux_free_bias:
        with torch.no_grad():
            layer.router.e_score_correction_bias.copy_(0.1 * torch.randn(8))
    x = torch.randn(4, 12, 16)
    for _ in range(2):  # two steps: the protected window moves
        keep, y_hand, protected_T = _expected(layer, x)
        y = layer(x)
        stats = layer.last_stats.as_dict()
        T, K = 48, cfg.num_experts_per_tok
        dropped = sum(not kept for row in keep for kept in row)
        assert dropped > 0
        assert stats["routed_pairs"] == T * K
        assert stats["dropped_pairs"] == dropped
        assert sum(stats["tokens_per_expert"]) == stats["routed_pairs"]  # loads count pairs before dropping
        processed = stats["routed_pairs"] - stats["dropped_pairs"]
        assert processed == sum(kept for row in keep for kept in row) == stats["processed_pairs"]
        assert torch.allclose(y, y_hand, rtol=1e-5, atol=1e-5)
        assert all(all(keep[t]) for t in range(T) if protected_T[t])
        layer.update_bias()  # end of the optimizer step: the protected window advances


def test_dropped_pair_contributes_zero_but_shared_experts_apply():
    cfg = MoEConfig(**dict(BASE, expert_capacity_factor=0.25))
    layer = _skewed_layer(cfg).train()
    x = torch.randn(2, 16, 16)
    keep, y_hand, _ = _expected(layer, x)
    y = layer(x).reshape(-1, 16)
    x_TH = x.reshape(-1, 16)
    with torch.no_grad():
        shared = layer.shared_experts(x_TH)
        y_full = layer.eval()(x).reshape(-1, 16)
    fully_dropped = [t for t in range(32) if not any(keep[t])]
    partly = [t for t in range(32) if any(keep[t]) and not all(keep[t])]
    assert fully_dropped and partly
    for t in fully_dropped:  # only the shared experts remain (the layer adds no residual)
        assert torch.allclose(y[t], shared[t], atol=1e-6)
        assert shared[t].abs().max() > 1e-3
    for t in partly:
        assert not torch.allclose(y[t], y_full[t], atol=1e-5)
    assert torch.allclose(y, y_hand.reshape(-1, 16), rtol=1e-5, atol=1e-5)


def test_protected_sequences_are_untouched():
    cfg = MoEConfig(**dict(V2_DROP, protected_seq_frac=0.5, device_capacity_factor=0.5))
    layer = _skewed_layer(cfg)
    x = torch.randn(4, 10, 16)
    with torch.no_grad():
        y_nodrop = layer.eval()(x)
    layer.train()
    step = int(layer.drop_step)
    protected = protected_sequences(torch.arange(4), 4, 0.5, step)
    assert int(protected.sum()) == 2
    with torch.no_grad():
        y = layer(x)
    assert layer.last_stats.as_dict()["dropped_pairs"] > 0
    for b in range(4):
        same = torch.allclose(y[b], y_nodrop[b], atol=1e-6)
        assert same == bool(protected[b]), b
    assert int(layer.drop_step) == step and layer.pending_drop_forwards == 1  # pending until the step ends
    layer.update_bias()
    assert int(layer.drop_step) == step + 1 and layer.pending_drop_forwards == 0


def test_eval_never_drops_without_eval_capacity():
    cfg = MoEConfig(**dict(V2_DROP, expert_capacity_factor=0.25))
    layer = _skewed_layer(cfg).eval()
    x = torch.randn(3, 10, 16)
    keep, y_hand, _ = _expected(layer, x, train=False, cf=None)
    assert all(all(row) for row in keep)
    y = layer(x)
    assert layer.last_stats.as_dict()["dropped_pairs"] == 0
    assert torch.allclose(y, y_hand, rtol=1e-5, atol=1e-5)
    assert int(layer.drop_step) == 0  # eval does not advance the protected window


def test_eval_capacity_applies_when_set():
    cfg = MoEConfig(**dict(BASE, expert_capacity_factor=4.0, eval_capacity_factor=0.5, drop_policy="position",
                           protected_seq_frac=1.0))
    layer = _skewed_layer(cfg).eval()
    x = torch.randn(3, 10, 16)
    keep, y_hand, _ = _expected(layer, x, train=False, cf=0.5)  # no protection in eval
    dropped = sum(not k for row in keep for k in row)
    assert dropped > 0
    y = layer(x)
    assert layer.last_stats.as_dict()["dropped_pairs"] == dropped
    assert torch.allclose(y, y_hand, rtol=1e-5, atol=1e-5)
    # In training the (larger) training capacity and the protection apply instead.
    layer.train()
    layer(x)
    assert layer.last_stats.as_dict()["dropped_pairs"] == 0


def test_dropping_keeps_gradients_of_kept_pairs_only():
    cfg = MoEConfig(**dict(BASE, n_shared_experts=0, expert_capacity_factor=0.25, expert_backend="loop"))
    layer = _skewed_layer(cfg).train()
    x = torch.randn(1, 24, 16)
    keep, _, _ = _expected(layer, x)
    layer(x).sum().backward()
    idx, _, _ = _routing_of(layer, x.reshape(-1, 16))
    used = {int(idx[t, k]) for t in range(24) for k in range(2) if keep[t][k]}
    for e in range(8):
        has_grad = bool(layer.experts.w_in.grad[e].abs().sum() > 0)
        assert has_grad == (e in used), e

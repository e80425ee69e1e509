"""Balance losses against literal, loop-by-loop transcriptions of the paper formulas.

Each ``literal_*`` function below is written from the formula in
shared/reference/deepseek-moe-algorithms.md with Python loops over tokens,
experts and devices; nothing is vectorised, so it shares no code path with
moe_ep.losses / moe_ep.balance. They operate on torch scalars, so the same
transcription also gives the reference gradient.
"""
import math

import pytest
import torch

from moe_ep import MoEConfig, MoELayer
from moe_ep import losses

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------ literal formulas
def literal_f_P(scores, selected, T, E, K):
    """f_i = N'/(K' T) sum_t 1(token t selects i),  P_i = (1/T) sum_t s_{i,t}."""
    f, P = [], []
    for i in range(E):
        hits = 0
        for t in range(T):
            if i in selected[t]:
                hits += 1
        f.append(E / (K * T) * hits)
        p = 0.0
        for t in range(T):
            p = p + scores[t][i]
        P.append(p / T)
    return f, P


def literal_expert_loss(scores, selected, K):
    """DeepSeekMoE Eq. 12-14: L_ExpBal / alpha_1 = sum_i f_i P_i."""
    T, E = len(scores), len(scores[0])
    f, P = literal_f_P(scores, selected, T, E, K)
    total = 0.0
    for i in range(E):
        total = total + f[i] * P[i]
    return total


def literal_device_loss(scores, selected, K, D):
    """DeepSeekMoE Eq. 15-17: sum_d f'_d P'_d, f'_d = mean_{j in E_d} f_j, P'_d = sum_{j in E_d} P_j."""
    T, E = len(scores), len(scores[0])
    f, P = literal_f_P(scores, selected, T, E, K)
    members = [[j for j in range(E) if j // (E // D) == d] for d in range(D)]
    total = 0.0
    for d in range(D):
        f_dev = sum(f[j] for j in members[d]) / len(members[d])
        P_dev = 0.0
        for j in members[d]:
            P_dev = P_dev + P[j]
        total = total + f_dev * P_dev
    return total


def literal_comm_loss(scores, selected, M, D):
    """V2 §2.2.3: sum_d f''_d P''_d, f''_d = D/(M T) sum_t 1(t is sent to device d), P''_d = sum_{j in E_d} P_j."""
    T, E = len(scores), len(scores[0])
    total = 0.0
    for d in range(D):
        sent = 0
        for t in range(T):
            if any(e // (E // D) == d for e in selected[t]):
                sent += 1
        f_dev = D / (M * T) * sent
        P_dev = 0.0
        for j in range(E):
            if j // (E // D) == d:
                for t in range(T):
                    P_dev = P_dev + scores[t][j] / T
        total = total + f_dev * P_dev
    return total


def literal_switch_loss(scores):
    """Switch: N sum_i f_i P_i, f_i = (1/T) sum_t 1(argmax_j s_{j,t} = i), P_i = (1/T) sum_t s_{i,t}."""
    T, E = len(scores), len(scores[0])
    total = 0.0
    for i in range(E):
        top1 = 0
        for t in range(T):
            best = max(range(E), key=lambda j: float(scores[t][j].detach()))
            top1 += best == i
        p = 0.0
        for t in range(T):
            p = p + scores[t][i]
        total = total + (top1 / T) * (p / T)
    return E * total


def literal_v3_sequence_loss(scores, selected, K):
    """V3 Eq. 17-20: sum_i f_i P_i with s'_{i,t} = s_{i,t} / sum_j s_{j,t} and f_i from the selection."""
    T, E = len(scores), len(scores[0])
    normalised = []
    for t in range(T):
        denom = 0.0
        for j in range(E):
            denom = denom + scores[t][j]
        normalised.append([scores[t][i] / denom for i in range(E)])
    return literal_expert_loss(normalised, selected, K)


def literal_z_loss(logits):
    """ST-MoE: (1/T) sum_t (log sum_i exp x_{i,t})^2."""
    T, E = len(logits), len(logits[0])
    total = 0.0
    for t in range(T):
        acc = 0.0
        for i in range(E):
            acc = acc + torch.exp(logits[t][i])
        total = total + torch.log(acc) ** 2
    return total / T


# ---------------------------------------------------------------- random data
def random_routing(T, E, K, dtype=torch.float64):
    scores = torch.randn(T, E, dtype=dtype).softmax(-1)
    selected = [sorted(torch.randperm(E)[:K].tolist()) for _ in range(T)]
    return scores, selected


def unit_stats(units, E, D):
    """The aggregated inputs of moe_ep.losses for a list of (scores, selected) units."""
    count = torch.zeros(len(units), E, dtype=torch.float64)
    top1 = torch.zeros(len(units), E, dtype=torch.float64)
    sent = torch.zeros(len(units), D, dtype=torch.float64)
    prob = torch.stack([s.sum(0) for s, _ in units])
    tokens = torch.tensor([float(len(sel)) for _, sel in units], dtype=torch.float64)
    for u, (scores, selected) in enumerate(units):
        for t, sel in enumerate(selected):
            for e in sel:
                count[u, e] += 1
            for d in {e // (E // D) for e in sel}:
                sent[u, d] += 1
            top1[u, int(scores[t].argmax())] += 1
    return count, top1, sent, prob, tokens


UNIT_LENGTHS = [5, 9, 1]


@pytest.mark.parametrize("E,K,D,M", [(8, 2, 4, 2), (16, 3, 4, 3), (6, 1, 3, 1)])
def test_loss_functions_match_literal_formulas(E, K, D, M):
    units = [random_routing(T, E, K) for T in UNIT_LENGTHS]
    count, top1, sent, prob, tokens = unit_stats(units, E, D)
    got = {
        "expert": losses.expert_balance_loss(count, prob, tokens, K),
        "device": losses.device_balance_loss(count, prob, tokens, K, D),
        "comm": losses.comm_balance_loss(sent, prob, tokens, M),
        "switch": losses.switch_balance_loss(top1, prob, tokens),
    }
    for u, (scores, selected) in enumerate(units):
        rows = [list(r) for r in scores]
        want = {
            "expert": literal_expert_loss(rows, selected, K),
            "device": literal_device_loss(rows, selected, K, D),
            "comm": literal_comm_loss(rows, selected, M, D),
            "switch": literal_switch_loss(rows),
        }
        for name in want:
            assert float(got[name][u]) == pytest.approx(float(want[name]), rel=1e-12), (name, u)


def test_v3_sequence_loss_is_expert_loss_on_renormalised_sigmoid_scores():
    E, K, T = 8, 2, 7
    logits = torch.randn(T, E, dtype=torch.float64)
    scores = logits.sigmoid()
    selected = [sorted(torch.randperm(E)[:K].tolist()) for _ in range(T)]
    count, _, _, _, tokens = unit_stats([(scores, selected)], E, 1)
    normalised = scores / scores.sum(-1, keepdim=True)
    got = losses.expert_balance_loss(count, normalised.sum(0, keepdim=True), tokens, K)
    want = literal_v3_sequence_loss([list(r) for r in scores], selected, K)
    assert float(got[0]) == pytest.approx(want.item(), rel=1e-12)


def test_z_loss_matches_literal():
    logits = 3 * torch.randn(11, 6, dtype=torch.float64)
    got = losses.router_z_loss(logits) / 11
    assert got.item() == pytest.approx(float(literal_z_loss([list(r) for r in logits])), rel=1e-12)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_uniform_routing_gives_one(K):
    # T = E tokens, token t selects experts t, t+1, ..., t+K-1 (mod E): every expert has K tokens;
    # uniform scores 1/E. Then f_i = 1, P_i = 1/E and every balance loss equals 1.
    E, D = 8, 4
    scores = torch.full((E, E), 1.0 / E, dtype=torch.float64)
    selected = [[(t + k) % E for k in range(K)] for t in range(E)]
    count, _, sent, prob, tokens = unit_stats([(scores, selected)], E, D)
    top1 = torch.ones(1, E, dtype=torch.float64)  # Switch: one first choice per expert
    assert float(losses.expert_balance_loss(count, prob, tokens, K)) == pytest.approx(1.0, rel=1e-12)
    assert float(losses.device_balance_loss(count, prob, tokens, K, D)) == pytest.approx(1.0, rel=1e-12)
    assert float(losses.switch_balance_loss(top1, prob, tokens)) == pytest.approx(1.0, rel=1e-12)
    if K == 2:  # both experts of token t on device t // 2: each device receives M*T/D tokens with M = 1
        selected = [[2 * (t // 2) + j for j in range(2)] for t in range(E)]
        _, _, sent, _, _ = unit_stats([(scores, selected)], E, D)
        assert float(losses.comm_balance_loss(sent, prob, tokens, 1)) == pytest.approx(1.0, rel=1e-12)
    # A collapsed routing is penalised: every token on expert 0.
    collapsed = [[k for k in range(K)] for _ in range(E)]
    count_c, _, _, _, _ = unit_stats([(scores, collapsed)], E, D)
    peaked = torch.full((1, E), 1e-3, dtype=torch.float64)
    peaked[0, :K] = (1 - 1e-3 * (E - K)) / K
    assert float(losses.expert_balance_loss(count_c, peaked * E, tokens, K)) > 1.5


# ------------------------------------------------------------------ end to end
ALPHAS = dict(expert_balance_coef=0.03, device_balance_coef=0.05, comm_balance_coef=0.02, switch_coef=0.01,
              z_loss_coef=1e-3)
BASE = dict(hidden_size=12, moe_intermediate_size=6, n_routed_experts=8, router_dtype="float64",
            expert_backend="loop")
CASES = {
    "v2_device_limited": dict(BASE, num_experts_per_tok=3, topk_method="device_limited", n_group=4, topk_group=2,
                              routed_scaling_factor=16.0, **ALPHAS),
    "greedy_device_groups": dict(BASE, num_experts_per_tok=2, device_groups=2, n_shared_experts=1, **ALPHAS),
    "v3_node_limited_bias": dict(BASE, num_experts_per_tok=4, scoring_func="sigmoid", topk_method="node_limited",
                                 n_group=4, topk_group=2, norm_topk_prob=True, aux_free_bias=True,
                                 seq_balance_coef=0.1, expert_balance_coef=0.02, z_loss_coef=1e-3),
}


def _device_limit(cfg):
    """M of the communication loss: topk_group when groups are devices, else min(K, D)."""
    D = cfg.device_groups or cfg.n_group
    if cfg.topk_method == "greedy":
        return min(cfg.num_experts_per_tok, D)
    return min(cfg.num_experts_per_tok, D, cfg.topk_group * max(1, D // cfg.n_group))


def literal_layer_loss(layer, x, scope):
    """alpha-weighted sum of the enabled losses, per sequence (mean over sequences) or over the batch."""
    cfg = layer.config
    B, S, H = x.shape
    x_TH = x.reshape(-1, H).to(torch.float64)
    W = layer.router.weight
    logits = x_TH @ W.T
    scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
    with torch.no_grad():
        selected = [sorted(r) for r in layer.router(x_TH).topk_idx_TK.tolist()]
    K = cfg.num_experts_per_tok
    D = cfg.device_groups or cfg.n_group
    M = _device_limit(cfg)
    rows = [list(r) for r in scores]
    units = [range(b * S, (b + 1) * S) for b in range(B)] if scope == "sequence" else [range(B * S)]

    def weighted(u):
        sc = [rows[t] for t in u]
        sel = [selected[t] for t in u]
        total = 0.0
        if cfg.expert_balance_coef:
            total = total + cfg.expert_balance_coef * literal_expert_loss(sc, sel, K)
        if cfg.device_balance_coef:
            total = total + cfg.device_balance_coef * literal_device_loss(sc, sel, K, D)
        if cfg.comm_balance_coef:
            total = total + cfg.comm_balance_coef * literal_comm_loss(sc, sel, M, D)
        if cfg.switch_coef:
            total = total + cfg.switch_coef * literal_switch_loss(sc)
        return total

    loss = sum(weighted(u) for u in units) / len(units)
    if cfg.seq_balance_coef:  # always per sequence
        seqs = [range(b * S, (b + 1) * S) for b in range(B)]
        loss = loss + cfg.seq_balance_coef * sum(
            literal_v3_sequence_loss([rows[t] for t in u], [selected[t] for t in u], K) for u in seqs) / B
    if cfg.z_loss_coef:
        loss = loss + cfg.z_loss_coef * literal_z_loss([list(r) for r in logits])
    return loss, selected


@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_aux_loss_matches_literal(case, scope):
    cfg = MoEConfig(**CASES[case], loss_scope=scope)
    layer = MoELayer(cfg).double().train()
    if cfg.aux_free_bias:
        with torch.no_grad():
            layer.router.e_score_correction_bias.copy_(0.2 * torch.randn(8))
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    layer(x)
    got = layer.aux_loss
    (grad_got,) = torch.autograd.grad(got, layer.router.weight)

    want, _ = literal_layer_loss(layer, x, scope)
    (grad_want,) = torch.autograd.grad(want, layer.router.weight)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    assert torch.allclose(grad_got, grad_want, rtol=1e-8, atol=1e-12)


def test_sequence_and_batch_scope_differ():
    cfg = MoEConfig(**CASES["v2_device_limited"])
    layer = MoELayer(cfg).double()
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    layer(x)
    per_seq = layer.aux_loss.item()
    batch_layer = MoELayer(cfg.replace(loss_scope="batch")).double()
    batch_layer.load_state_dict(layer.state_dict())
    batch_layer(x)
    assert abs(per_seq - batch_layer.aux_loss.item()) > 1e-6


def test_v3_sequence_loss_counts_the_actual_biased_selection():
    cfg = MoEConfig(**{**CASES["v3_node_limited_bias"], "expert_balance_coef": 0.0, "z_loss_coef": 0.0})
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        layer.router.e_score_correction_bias.copy_(torch.linspace(-0.4, 0.4, 8, dtype=torch.float64))
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    layer(x)
    want, selected = literal_layer_loss(layer, x, "sequence")
    assert layer.aux_loss.item() == pytest.approx(want.item(), rel=1e-10)
    # The alternative reading of Eq. 18 (unbiased top-K of s) gives another value here.
    scores = (x.reshape(-1, 12) @ layer.router.weight.T).sigmoid()
    unbiased = [sorted(r) for r in scores.topk(cfg.num_experts_per_tok, dim=-1).indices.tolist()]
    assert unbiased != selected
    alt = sum(literal_v3_sequence_loss([list(r) for r in scores[b * 9:(b + 1) * 9]], unbiased[b * 9:(b + 1) * 9],
                                       cfg.num_experts_per_tok) for b in range(2)) / 2 * cfg.seq_balance_coef
    assert abs(alt.item() - layer.aux_loss.item()) > 1e-9


def test_two_dimensional_input_is_one_sequence():
    cfg = MoEConfig(**CASES["greedy_device_groups"])
    layer = MoELayer(cfg).double()
    x = torch.randn(10, 12, dtype=torch.float64)
    layer(x)
    want, _ = literal_layer_loss(layer, x.unsqueeze(0), "sequence")
    assert layer.aux_loss.item() == pytest.approx(want.item(), rel=1e-10)


def test_no_loss_enabled_gives_zero():
    layer = MoELayer(MoEConfig(hidden_size=12, moe_intermediate_size=6))
    layer(torch.randn(2, 3, 12))
    assert layer.aux_loss.item() == 0.0 and math.isfinite(layer.aux_loss.item())

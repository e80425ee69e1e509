"""MoEConfig: validation names the field, paper presets, scaled-down overrides, from_hf_config."""
import dataclasses

import pytest
import torch

from moe_ep import MoEConfig, MoELayer
from moe_ep.config import PRESETS

pytestmark = pytest.mark.timeout(120)

TINY = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2)


def _raises_naming(field, **kwargs):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}\b") as info:
        MoEConfig(**{**TINY, **kwargs})
    return str(info.value)


# ------------------------------------------------------------------ validation
def test_experts_not_divisible_by_groups():
    msg = _raises_naming("n_routed_experts", n_routed_experts=10, n_group=4)
    assert "n_group=4" in msg
    MoEConfig(**{**TINY, "n_group": 4})  # 8 experts in 4 groups is fine


@pytest.mark.parametrize("method", ["device_limited", "node_limited"])
def test_topk_larger_than_reachable_experts(method):
    # 8 experts in 4 groups of 2; keeping 1 group reaches 2 experts < K = 3.
    extra = dict(scoring_func="sigmoid") if method == "node_limited" else {}
    msg = _raises_naming("num_experts_per_tok", topk_method=method, n_group=4, topk_group=1,
                         num_experts_per_tok=3, **extra)
    assert "reachable" in msg
    # The same numbers are fine once 2 groups (4 experts) are kept, and for greedy routing.
    MoEConfig(**{**TINY, "topk_method": "device_limited", "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3})
    MoEConfig(**{**TINY, "n_group": 4, "topk_group": 1, "num_experts_per_tok": 3})


def test_group_score_topk_is_validated_and_defaults_to_k_over_m():
    V3 = dict(scoring_func="sigmoid", topk_method="node_limited", n_routed_experts=16, n_group=4, topk_group=2,
              num_experts_per_tok=6)
    assert MoEConfig(**{**TINY, **V3}).group_score_k == 3
    assert MoEConfig(**{**TINY, **V3, "group_score_topk": 2}).group_score_k == 2
    for bad in (0, 5):  # 5 > the 4 experts of a group
        msg = _raises_naming("group_score_topk", **V3, group_score_topk=bad)
        assert "at most the 4 experts" in msg
    assert "must be an int or None" in _raises_naming("group_score_topk", **V3, group_score_topk=2.0)
    # An explicit count also lifts the K >= M guard, which only protects K // M.
    MoEConfig(**{**TINY, **V3, "num_experts_per_tok": 1, "group_score_topk": 2})


def test_node_limited_needs_k_at_least_topk_group():
    msg = _raises_naming("num_experts_per_tok", scoring_func="sigmoid", topk_method="node_limited",
                         n_routed_experts=16, n_group=8, topk_group=4, num_experts_per_tok=2)
    assert "topk_group" in msg
    MoEConfig(**{**TINY, "scoring_func": "sigmoid", "topk_method": "node_limited", "n_routed_experts": 16,
                 "n_group": 8, "topk_group": 4, "num_experts_per_tok": 4})


def test_topk_larger_than_experts_and_topk_group_larger_than_groups():
    _raises_naming("num_experts_per_tok", num_experts_per_tok=9)
    _raises_naming("topk_group", n_group=2, topk_group=3)


@pytest.mark.parametrize("field", ["expert_balance_coef", "device_balance_coef", "comm_balance_coef",
                                   "seq_balance_coef", "switch_coef", "z_loss_coef", "bias_update_rate",
                                   "router_jitter"])
def test_negative_coefficients(field):
    msg = _raises_naming(field, **{field: -1e-3})
    assert "-0.001" in msg
    _raises_naming(field, **{field: float("nan")})


@pytest.mark.parametrize("field,value", [("scoring_func", "relu"), ("topk_method", "sinkhorn"),
                                         ("activation", "tanh"), ("loss_scope", "token"),
                                         ("drop_policy", "random"), ("expert_backend", "cutlass"),
                                         ("router_dtype", "int8"), ("dispatcher", "two_hop")])
def test_unknown_names(field, value):
    msg = _raises_naming(field, **{field: value})
    assert value in msg


@pytest.mark.parametrize("field,value", [("expert_capacity_factor", 0.0), ("device_capacity_factor", -1.0),
                                         ("eval_capacity_factor", float("inf")), ("protected_seq_frac", 1.5),
                                         ("routed_scaling_factor", 0.0), ("device_groups", 3),
                                         ("hidden_size", 0), ("n_shared_experts", -1)])
def test_out_of_range_values(field, value):
    _raises_naming(field, **{field: value})


@pytest.mark.parametrize("field,value,kind", [
    ("hidden_size", True, "an int"), ("hidden_size", "16", "an int"), ("n_routed_experts", None, "an int"),
    ("num_experts_per_tok", 2.0, "an int"), ("device_groups", "2", "an int or None"),
    ("routed_scaling_factor", "16", "a number"), ("router_jitter", None, "a number"),
    ("protected_seq_frac", True, "a number"), ("expert_capacity_factor", "1.25", "a number or None"),
    ("norm_topk_prob", 1, "a bool"), ("check_finite", "yes", "a bool"), ("aux_free_bias", None, "a bool"),
    ("scoring_func", 1, "a string"), ("router_dtype", torch.float32, "a string"), ("dispatcher", None, "a string"),
])
def test_wrong_types_name_the_field(field, value, kind):
    # Before: a string or None in a number field raised TypeError from a comparison, and True passed as 1.
    msg = _raises_naming(field, **{field: value})
    assert f"must be {kind}, got {value!r} ({type(value).__name__})" in msg


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="deepseek-v4"):
        MoEConfig.preset("deepseek-v4")
    with pytest.raises(ValueError, match="n_experts"):
        MoEConfig.preset("deepseek-v3", n_experts=4)
    with pytest.raises(ValueError, match=r"MoEConfig\.replace: unknown field\(s\) \['n_experts'\]"):
        MoEConfig(**TINY).replace(n_experts=4)
    from transformers import DeepseekV3Config
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig.from_hf_config(DeepseekV3Config(), top_k=2)


def test_replace_revalidates():
    cfg = MoEConfig(**TINY)
    assert cfg.replace(num_experts_per_tok=3).num_experts_per_tok == 3
    with pytest.raises(ValueError, match=r"MoEConfig\.num_experts_per_tok"):
        cfg.replace(num_experts_per_tok=100)


# --------------------------------------------------------------------- presets
# Values from shared/reference/deepseek-moe-algorithms.md (section in the comment).
EXPECTED_PRESETS = {
    # Switch (§5.3): top-1 softmax, alpha = 1e-2, capacity 1.25 (mesh-tf default), jitter 1e-2.
    "switch": dict(num_experts_per_tok=1, scoring_func="softmax", switch_coef=1e-2, expert_capacity_factor=1.25,
                   drop_policy="position", router_jitter=1e-2, norm_topk_prob=False),
    # GShard (§5.2): top-2, gates renormalised over the two, capacity 1.25 train / 2.0 eval, position order.
    "gshard": dict(num_experts_per_tok=2, scoring_func="softmax", norm_topk_prob=True, expert_capacity_factor=1.25,
                   eval_capacity_factor=2.0, drop_policy="position"),
    # DeepSeekMoE 16B (§1.6): 2 shared + 64 routed (6), alpha_1 = 0.001, no device loss, no dropping.
    "deepseek-moe-16b": dict(hidden_size=2048, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                             scoring_func="softmax", topk_method="greedy", expert_balance_coef=1e-3,
                             device_balance_coef=0.0, expert_capacity_factor=None, device_capacity_factor=None),
    # DeepSeek-V2 (§2.2-2.5): 2 + 160 (6), I = 1536, H = 5120, D = 8, M = 3, scale 16, no renormalisation,
    # alphas 0.003 / 0.05 / 0.02, device capacity 1.0, 10% protected, no eval dropping.
    "deepseek-v2": dict(hidden_size=5120, moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=2,
                        num_experts_per_tok=6, scoring_func="softmax", topk_method="device_limited", n_group=8,
                        topk_group=3, routed_scaling_factor=16.0, norm_topk_prob=False, expert_balance_coef=3e-3,
                        device_balance_coef=5e-2, comm_balance_coef=2e-2, device_capacity_factor=1.0,
                        protected_seq_frac=0.1, eval_capacity_factor=None, aux_free_bias=False),
    # DeepSeek-V2-Lite (§2.5): 2 + 64 (6), I = 1408, greedy, scale 1.0, alpha_1 = 0.001 only.
    "deepseek-v2-lite": dict(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
                             num_experts_per_tok=6, topk_method="greedy", routed_scaling_factor=1.0,
                             expert_balance_coef=1e-3, device_balance_coef=0.0, comm_balance_coef=0.0),
    # DeepSeek-V3 (§3.1-3.6): 1 + 256 (8), I = 2048, H = 7168, sigmoid, 8 groups, 4 kept, norm, scale 2.5,
    # aux-free bias gamma = 1e-3, sequence-wise alpha = 1e-4, no dropping.
    "deepseek-v3": dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
                        num_experts_per_tok=8, scoring_func="sigmoid", topk_method="node_limited", n_group=8,
                        topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, aux_free_bias=True,
                        bias_update_rate=1e-3, seq_balance_coef=1e-4, expert_balance_coef=0.0,
                        expert_capacity_factor=None, device_capacity_factor=None),
}


def test_every_preset_is_checked():
    assert set(EXPECTED_PRESETS) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_values(name):
    cfg = MoEConfig.preset(name)
    for field, value in EXPECTED_PRESETS[name].items():
        assert getattr(cfg, field) == value, (name, field)


def test_v3_group_score_width_is_k_over_m():
    # V3's official code hard-codes top-2 per group: K_r / M = 8 / 4.
    cfg = MoEConfig.preset("deepseek-v3")
    assert cfg.num_experts_per_tok // cfg.topk_group == 2
    # V2: M = 3 of D = 8 devices reach 3 * 160 / 8 = 60 experts >= K.
    v2 = MoEConfig.preset("deepseek-v2")
    assert v2.topk_group * v2.n_routed_experts // v2.n_group >= v2.num_experts_per_tok


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_scaled_down_preset_keeps_the_method_and_runs(name):
    small = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=16)
    cfg = MoEConfig.preset(name, **small)
    full = MoEConfig.preset(name)
    for field in dataclasses.fields(MoEConfig):
        if field.name not in small:
            assert getattr(cfg, field.name) == getattr(full, field.name), field.name
    layer = MoELayer(cfg)
    x = torch.randn(2, 8, 16)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.isfinite(layer.aux_loss)


def test_scaled_down_override_is_validated():
    with pytest.raises(ValueError, match=r"MoEConfig\.n_routed_experts"):
        MoEConfig.preset("deepseek-v3", n_routed_experts=12)  # not divisible by 8 groups


# ------------------------------------------------------------- from_hf_config
HF_TINY = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
               num_experts_per_tok=3)


def test_from_hf_config_v2_greedy():
    from transformers import DeepseekV2Config
    hf = DeepseekV2Config(**HF_TINY, topk_method="greedy", n_group=4, topk_group=2, routed_scaling_factor=1.0)
    cfg = MoEConfig.from_hf_config(hf)
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.n_shared_experts,
            cfg.num_experts_per_tok) == (32, 16, 8, 2, 3)
    assert cfg.scoring_func == "softmax" and cfg.topk_method == "greedy"
    assert (cfg.n_group, cfg.topk_group) == (1, 1)  # greedy ignores the groups
    assert not cfg.aux_free_bias and not cfg.norm_topk_prob
    assert cfg.shared_width == 2 * 16


def test_from_hf_config_v2_group_limited():
    from transformers import DeepseekV2Config
    hf = DeepseekV2Config(**HF_TINY, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                          routed_scaling_factor=16.0)
    cfg = MoEConfig.from_hf_config(hf, expert_balance_coef=3e-3)
    assert cfg.topk_method == "device_limited" and cfg.scoring_func == "softmax"
    assert (cfg.n_group, cfg.topk_group) == (4, 2)
    assert cfg.routed_scaling_factor == 16.0
    assert cfg.expert_balance_coef == 3e-3


def test_from_hf_config_v3():
    from transformers import DeepseekV3Config
    hf = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, n_shared_experts=1,
                          num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                          norm_topk_prob=True)
    cfg = MoEConfig.from_hf_config(hf)
    assert cfg.scoring_func == "sigmoid" and cfg.topk_method == "node_limited" and cfg.aux_free_bias
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (16, 4, 4, 2)
    assert cfg.norm_topk_prob and cfg.routed_scaling_factor == 2.5
    assert cfg.n_shared_experts == 1
    assert cfg.group_score_topk == 2  # transformers' (and DeepSeek's) top-2 group score, not K/M


def test_from_hf_config_rejects_unsupported():
    from transformers import DeepseekV2Config
    with pytest.raises(ValueError, match="hidden_act"):
        MoEConfig.from_hf_config(DeepseekV2Config(**HF_TINY, hidden_act="gelu"))
    with pytest.raises(ValueError, match="topk_method"):
        MoEConfig.from_hf_config(DeepseekV2Config(**HF_TINY, topk_method="sinkhorn"))


def test_nodes_per_ep_group_refuses_groups_straddling_nodes():
    from moe_ep.parallel.state import nodes_per_ep_group

    assert nodes_per_ep_group(16, 8) == 2 and nodes_per_ep_group(8, 8) == 1 and nodes_per_ep_group(4, 8) == 1
    with pytest.raises(ValueError, match="does not fill whole nodes"):
        nodes_per_ep_group(12, 8)
    with pytest.raises(ValueError, match="straddle nodes"):
        nodes_per_ep_group(3, 8)

"""Parity with transformers' DeepseekV2Moe / DeepseekV3MoE (tiny random blocks, no download)."""
import pytest
import torch

from moe_ep import MoEConfig, MoELayer
from moe_ep.interop import from_hf_moe, to_hf_state_dict

pytestmark = pytest.mark.timeout(120)

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DeepseekV3Config  # noqa: E402
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402

H = 32
V2_TINY = dict(hidden_size=H, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
               num_experts_per_tok=3, n_group=4, topk_group=2)
# K / topk_group = 2: transformers (like DeepSeek's code) scores a group by its top-2 biased scores.
V3_TINY = dict(hidden_size=H, moe_intermediate_size=16, n_routed_experts=16, n_shared_experts=1,
               num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)


def _hf_config(kind, **extra):
    if kind == "v3":
        cfg = DeepseekV3Config(**{**V3_TINY, **extra})
    else:
        method = "greedy" if kind == "v2_greedy" else "group_limited_greedy"
        cfg = DeepseekV2Config(**{**V2_TINY, "topk_method": method, "routed_scaling_factor": 16.0, **extra})
    cfg._experts_implementation = "eager"  # the block is used standalone, outside a PreTrainedModel
    return cfg


def _randomise(module):
    """transformers may leave the weights empty: draw every tensor of the block."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            torch.nn.init.normal_(p, std=0.5 if name == "gate.weight" else 0.1)
        if hasattr(module.gate, "e_score_correction_bias"):
            torch.nn.init.normal_(module.gate.e_score_correction_bias, std=0.2)
    return module


def _hf_block(kind, **extra):
    cfg = _hf_config(kind, **extra)
    block = DeepseekV3MoE(cfg) if kind == "v3" else DeepseekV2Moe(cfg)
    return _randomise(block).eval(), cfg


KINDS = ["v2_greedy", "v2_group_limited", "v3"]


@pytest.mark.parametrize("kind", KINDS)
def test_from_hf_moe_matches_transformers(kind):
    hf, cfg = _hf_block(kind)
    layer = from_hf_moe(hf, cfg).eval()
    expected_method = {"v2_greedy": "greedy", "v2_group_limited": "device_limited", "v3": "node_limited"}[kind]
    assert layer.config.topk_method == expected_method
    for shape in [(2, 5, H), (3, 7, H), (1, 1, H)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = hf(x)
            got = layer(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_v3_bias_matters_for_parity():
    hf, cfg = _hf_block("v3")
    assert hf.gate.e_score_correction_bias.abs().min() > 0
    layer = from_hf_moe(hf, cfg).eval()
    assert torch.equal(layer.router.e_score_correction_bias, hf.gate.e_score_correction_bias)
    x = torch.randn(4, 8, H)
    with torch.no_grad():
        y = layer(x)
        layer.router.e_score_correction_bias.zero_()
        y_unbiased = layer(x)
    assert not torch.allclose(y, y_unbiased, atol=1e-4)  # the bias changes the routing of some tokens


def test_group_limit_matters_for_parity():
    hf, cfg = _hf_block("v2_group_limited")
    layer = from_hf_moe(hf, cfg).eval()
    greedy = from_hf_moe(hf, _hf_config("v2_greedy")).eval()
    x = torch.randn(4, 8, H)
    with torch.no_grad():
        assert not torch.allclose(layer(x), greedy(x), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_hf_state_dict(kind):
    hf, cfg = _hf_block(kind)
    layer = from_hf_moe(hf, cfg)
    state = to_hf_state_dict(layer)
    assert set(state) == set(hf.state_dict())
    for key, tensor in hf.state_dict().items():
        assert state[key].shape == tensor.shape, key
        assert torch.equal(state[key], tensor), key
    fresh = _randomise(DeepseekV3MoE(cfg) if kind == "v3" else DeepseekV2Moe(cfg)).eval()
    fresh.load_state_dict(state)  # strict
    x = torch.randn(2, 6, H)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), hf(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_native_layer_exports_to_transformers(kind):
    """A layer initialised by moe_ep (and given a random bias) runs identically inside transformers."""
    cfg = _hf_config(kind)
    layer = MoELayer(MoEConfig.from_hf_config(cfg)).eval()
    if layer.config.aux_free_bias:
        with torch.no_grad():
            layer.router.e_score_correction_bias.normal_(std=0.2)
    hf = DeepseekV3MoE(cfg) if kind == "v3" else DeepseekV2Moe(cfg)
    hf.load_state_dict(to_hf_state_dict(layer))
    x = torch.randn(3, 5, H)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), hf.eval()(x), rtol=1e-5, atol=1e-6)


def test_v2_norm_topk_prob_is_ignored_like_transformers():
    hf, cfg = _hf_block("v2_group_limited", norm_topk_prob=True)
    layer = from_hf_moe(hf, cfg).eval()
    assert not layer.config.norm_topk_prob
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), hf(x), rtol=1e-5, atol=1e-6)


def test_overrides_reach_the_config():
    hf, cfg = _hf_block("v3")
    layer = from_hf_moe(hf, cfg, seq_balance_coef=1e-4, expert_backend="loop")
    assert layer.config.seq_balance_coef == 1e-4 and layer.config.expert_backend == "loop"


def test_mismatched_shapes_raise():
    hf, _ = _hf_block("v2_group_limited")
    with pytest.raises(ValueError, match="experts.gate_up_proj"):
        from_hf_moe(hf, _hf_config("v2_group_limited", moe_intermediate_size=8))
    with pytest.raises(ValueError, match="gate.weight"):
        from_hf_moe(hf, _hf_config("v2_group_limited", n_routed_experts=16))
    with pytest.raises(ValueError, match="shared_experts.gate_proj.weight"):
        from_hf_moe(hf, _hf_config("v2_group_limited", n_shared_experts=1))
    with pytest.raises(ValueError, match="gate/experts"):
        from_hf_moe(torch.nn.Linear(2, 2), _hf_config("v2_greedy"))


def test_to_hf_state_dict_rejects_non_deepseek_layers():
    with pytest.raises(ValueError, match="SwiGLU"):
        to_hf_state_dict(MoELayer(MoEConfig(hidden_size=8, moe_intermediate_size=4, activation="gelu")))


@pytest.mark.parametrize("extra", [dict(num_experts_per_tok=6, topk_group=2),
                                   dict(num_experts_per_tok=4, n_group=2, topk_group=1)], ids=["K6M2", "K4G2M1"])
def test_v3_group_score_is_top2_whatever_k_over_m(extra):
    """transformers scores a group by its top-2 biased scores; K/M (3, 4 here) would route differently."""
    hf, cfg = _hf_block("v3", **extra)
    layer = from_hf_moe(hf, cfg).eval()
    assert layer.config.group_score_topk == 2 and layer.config.group_score_k == 2
    megatron = from_hf_moe(hf, cfg, group_score_topk=None).eval()
    assert megatron.config.group_score_k == extra["num_experts_per_tok"] // extra["topk_group"]
    x = torch.randn(16, 8, H)
    with torch.no_grad():
        want = hf(x)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(megatron(x), want, atol=1e-4)


def test_bf16_block_keeps_expert_dtype():
    hf, cfg = _hf_block("v3")
    hf = hf.to(torch.bfloat16)
    layer = from_hf_moe(hf, cfg).eval()
    assert layer.experts.w_in.dtype == torch.bfloat16
    assert layer.shared_experts.down_proj.weight.dtype == torch.bfloat16
    assert layer.router.weight.dtype == torch.float32
    x = torch.randn(2, 4, H).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).float(), hf(x).float(), rtol=3e-2, atol=3e-2)

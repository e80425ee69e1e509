"""MoETransformerLM: shapes, causality, aux loss, layer kinds, presets, initialisation."""
import pytest
import torch

from moe_ep import MoELayer, ParallelState
from moe_ep.models import MODEL_PRESETS, ModelConfig, MoETransformerLM
from moe_ep.models.layers import DenseFFN
from moe_ep.model_moe import moe_layers, total_aux_loss, update_moe_bias

pytestmark = pytest.mark.timeout(120)


def small(**overrides) -> ModelConfig:
    """The tiny preset, narrower and shorter for speed."""
    base = ModelConfig.preset("tiny")
    moe = base.moe.replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8)
    fields = dict(hidden_size=32, n_layers=3, n_heads=2, dense_intermediate_size=64, max_seq_len=16, moe=moe)
    return base.replace(**{**fields, **overrides})


def test_logits_shape_and_dtype():
    model = MoETransformerLM(small())
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("preset_moe", [{}, dict(scoring_func="sigmoid", topk_method="node_limited", n_group=4,
                                                 topk_group=2, num_experts_per_tok=4, aux_free_bias=True)],
                         ids=["softmax", "v3_routing"])
def test_future_tokens_do_not_change_past_logits(preset_moe):
    cfg = small()
    model = MoETransformerLM(cfg.replace(moe=cfg.moe.replace(**preset_moe))).eval()
    ids = torch.randint(0, 256, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 256
    with torch.no_grad():
        before, after = model(ids), model(changed)
    # Past logits agree up to round-off (expert batches regroup rows); future ones move.
    assert (before[:, :10] - after[:, :10]).abs().max() < 1e-5
    assert (before[:, 10:] - after[:, 10:]).abs().max() > 1e-2


def test_aux_loss_is_the_sum_of_moe_layers_and_has_gradient():
    cfg = small(n_layers=4, first_k_dense=1)
    model = MoETransformerLM(cfg)
    model(torch.randint(0, 256, (2, 16)))
    layers = moe_layers(model)
    assert len(layers) == 3
    expected = sum(layer.aux_loss for layer in layers)
    assert total_aux_loss(model).item() == pytest.approx(expected.item(), rel=1e-6)
    assert total_aux_loss(model).item() > 0
    total_aux_loss(model).backward()
    assert all(layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
               for layer in layers)


@pytest.mark.parametrize("first_k_dense", [0, 1, 2, 3])
def test_first_k_blocks_are_dense(first_k_dense):
    model = MoETransformerLM(small(n_layers=3, first_k_dense=first_k_dense))
    kinds = [type(block.ffn) for block in model.layers.values()]
    assert kinds == [DenseFFN] * first_k_dense + [MoELayer] * (3 - first_k_dense)
    assert len(moe_layers(model)) == 3 - first_k_dense


def test_tied_and_untied_embeddings():
    tied = MoETransformerLM(small(tie_embeddings=True))
    untied = MoETransformerLM(small(tie_embeddings=False))
    assert tied.lm_head is None and untied.lm_head is not None
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 256 * 32
    ids = torch.randint(0, 256, (1, 8))
    tied(ids).sum().backward()
    assert tied.embed.weight.grad is not None


def test_update_moe_bias_moves_only_aux_free_layers():
    cfg = small()
    v3 = MoETransformerLM(cfg.replace(moe=cfg.moe.replace(aux_free_bias=True, bias_update_rate=0.01)))
    v3(torch.randint(0, 256, (4, 16)))
    update_moe_bias(v3)
    for layer in moe_layers(v3):
        bias = layer.router.e_score_correction_bias
        assert bias.abs().max().item() == pytest.approx(0.01)
        assert layer.load_accum.abs().sum() == 0
    plain = MoETransformerLM(cfg)
    plain(torch.randint(0, 256, (4, 16)))
    update_moe_bias(plain)
    assert all(layer.load_accum.abs().sum() == 0 for layer in moe_layers(plain))


def test_sequence_longer_than_max_seq_len_raises():
    model = MoETransformerLM(small(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 256, (1, 9)))


def test_config_validation():
    with pytest.raises(ValueError, match="moe"):
        small(hidden_size=48)
    with pytest.raises(ValueError, match="first_k_dense"):
        small(first_k_dense=4)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("nope")


def test_presets_mirror_their_papers():
    tiny = ModelConfig.preset("tiny")
    assert tiny.vocab_size == 256 and tiny.n_layers == 4 and tiny.first_k_dense == 1
    assert tiny.moe.n_routed_experts == 16 and tiny.moe.n_shared_experts == 1
    v2 = ModelConfig.preset("v2-lite-mini").moe
    assert (v2.n_routed_experts, v2.n_shared_experts, v2.num_experts_per_tok) == (64, 2, 6)
    assert (v2.scoring_func, v2.topk_method, v2.expert_balance_coef) == ("softmax", "greedy", 1e-3)
    v3 = ModelConfig.preset("v3-mini").moe
    assert (v3.scoring_func, v3.topk_method, v3.n_group, v3.topk_group) == ("sigmoid", "node_limited", 8, 4)
    assert v3.aux_free_bias and v3.seq_balance_coef == 1e-4 and v3.routed_scaling_factor == 2.5
    for name in MODEL_PRESETS:
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_init_is_deterministic_and_layout_independent():
    cfg = small()
    full = MoETransformerLM(cfg, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(),
                                                 MoETransformerLM(cfg, seed=3).state_dict().values()))
    assert not torch.equal(full.embed.weight, MoETransformerLM(cfg, seed=4).embed.weight)
    # An EP rank's model (built without collectives) holds the matching slice of every expert stack.
    shard = MoETransformerLM(cfg, ParallelState(ep_size=2, ep_rank=1), seed=3)
    full_state = full.state_dict()
    for name, tensor in shard.state_dict().items():
        expected = full_state[name][4:8] if ".experts." in name else full_state[name]
        assert torch.equal(tensor, expected), name

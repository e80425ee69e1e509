"""Router replay (moe_ep/replay.py) on one process: a replayed forward equals the recorded one, the router keeps its
gradient, activation checkpointing recomputes with the replayed experts, records save, shapes are checked.

Expert parallelism: tests/parallel/test_replay.py."""
import pytest
import torch

import moe_ep
from moe_ep.model_moe import moe_layers
from moe_ep.models import ModelConfig, MoETransformerLM

pytestmark = pytest.mark.timeout(120)


def small_config() -> ModelConfig:
    """The tiny preset, narrower, 2 MoE layers of 8 experts (K = 2), capacity 1.0 in training."""
    base = ModelConfig.preset("tiny")
    moe = base.moe.replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, expert_capacity_factor=1.0)
    return base.replace(hidden_size=32, n_layers=3, n_heads=2, dense_intermediate_size=64, max_seq_len=16, moe=moe)


def small() -> MoETransformerLM:
    return MoETransformerLM(small_config(), seed=0)


def ids(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(5))


def step(model: MoETransformerLM, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits and every parameter's gradient of ``sum(logits^2) + aux`` (gradients cleared first)."""
    model.zero_grad(set_to_none=True)
    logits = model(batch)
    (logits.square().sum() + sum(layer.aux_loss for layer in moe_layers(model))).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def perturb_routers(model: MoETransformerLM) -> None:
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.add_(torch.randn(layer.router.weight.shape,
                                                 generator=torch.Generator().manual_seed(9)))


def test_replayed_forward_equals_the_recorded_one():
    model = small().train()
    with moe_ep.record_routing(model) as rec:
        logits, grads = step(model, ids())
    stats = [layer.last_stats.as_dict() for layer in moe_layers(model)]
    assert sorted(rec.experts) == ["layers.1.ffn", "layers.2.ffn"]
    assert all(t.dtype == torch.int32 and t.shape == (64, 2) for t in rec.experts.values())
    assert sum(s["dropped_pairs"] for s in stats) > 0  # capacity 1.0 drops: replay must drop alike
    with moe_ep.replay_routing(model, rec):
        replayed, replayed_grads = step(model, ids())
    assert torch.equal(replayed, logits)
    assert grads.keys() == replayed_grads.keys() and all(torch.equal(grads[n], replayed_grads[n]) for n in grads)
    assert [layer.last_stats.as_dict() for layer in moe_layers(model)] == stats

    perturb_routers(model)  # the router now prefers other experts
    with moe_ep.record_routing(model) as live:
        model(ids())
    assert any(not torch.equal(live.experts[k], rec.experts[k]) for k in rec.experts)
    with moe_ep.replay_routing(model, rec), moe_ep.record_routing(model) as again:
        moved, moved_grads = step(model, ids())
    assert all(torch.equal(again.experts[k], rec.experts[k]) for k in rec.experts)  # the recorded experts ...
    assert not torch.allclose(moved, logits)  # ... with the live router's gate values
    assert all(moved_grads[f"{k}.router.weight"].abs().sum() > 0 for k in rec.experts)


def test_checkpointed_recomputation_replays_the_same_experts():
    model = small().train()
    with moe_ep.record_routing(model) as rec:
        model(ids())
    perturb_routers(model)
    _, plain = step_in(model, rec, checkpointing=False)
    with moe_ep.record_routing(model) as during:  # the recomputation in backward records nothing more
        _, checkpointed = step_in(model, rec, checkpointing=True)
    assert all(t.shape == (64, 2) for t in during.experts.values())
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)


def step_in(model: MoETransformerLM, rec, checkpointing: bool) -> tuple[torch.Tensor, dict]:
    """``step`` with the forward replaying ``rec`` and the backward (the recomputation) after the replay ended."""
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    with moe_ep.replay_routing(model, rec):
        logits = model(ids())
        loss = logits.square().sum() + sum(layer.aux_loss for layer in moe_layers(model))
    loss.backward()
    model.activation_checkpointing = False
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_saved_record_replays_and_a_misfit_one_is_named(tmp_path):
    model, batch = small().eval(), ids()
    with moe_ep.record_routing(model) as rec, torch.no_grad():
        model(batch)
    torch.save(rec.experts, tmp_path / "routing.pt")
    loaded = torch.load(tmp_path / "routing.pt", weights_only=True)
    perturb_routers(model)
    with moe_ep.replay_routing(model, loaded), moe_ep.record_routing(model) as again, torch.no_grad():
        model(batch[:2])  # micro-batches of the recorded batch, in order
        model(batch[2:])
    assert all(torch.equal(again.experts[k], rec.experts[k]) for k in rec.experts)

    with pytest.raises(moe_ep.RoutingReplayError, match="'layers.1.ffn': a forward of 80 tokens, but the record has "
                                                         "64 of its 64 tokens left"), torch.no_grad():
        with moe_ep.replay_routing(model, loaded):
            model(torch.randint(0, 256, (5, 16)))
    with pytest.raises(moe_ep.RoutingReplayError, match="used fewer tokens than recorded"), torch.no_grad():
        with moe_ep.replay_routing(model, loaded):
            model(batch[:2])
    bad = [({**loaded, "layers.9.ffn": loaded["layers.1.ffn"]}, r"unknown \['layers.9.ffn'\]"),
           ({"layers.1.ffn": loaded["layers.1.ffn"]}, r"missing \['layers.2.ffn'\]"),
           ({**loaded, "layers.2.ffn": loaded["layers.2.ffn"][:, :1]}, r"must be integers \[N, 2\]"),
           ({**loaded, "layers.2.ffn": loaded["layers.2.ffn"] + 8}, r"has 8 experts; its record holds ids in")]
    for record, match in bad:
        with pytest.raises(moe_ep.RoutingReplayError, match=match):
            with moe_ep.replay_routing(model, record):
                pass

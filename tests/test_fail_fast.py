"""Fail-fast pieces that need no process group: mismatch messages, check_finite, lost-pair detection.

The multi-process guarantees are in tests/parallel/test_fail_fast.py.
"""
from datetime import timedelta

import pytest
import torch

from moe_ep import MoEConfig, MoELayer
from moe_ep.balance import RoutingStats
from moe_ep.finite import NonFiniteError
from moe_ep.parallel.consistency import describe_mismatch
from moe_ep.parallel.timeout import as_timedelta
from moe_ep.training.metrics import IntervalMeter
from moe_ep.training.step import StepResult
from moe_ep.model_moe import moe_layers

pytestmark = pytest.mark.timeout(60)

BASE = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            check_finite=True)


def test_mismatch_names_the_first_differing_field_and_every_rank():
    same = dict(hidden_size=32, n_group=1)
    assert describe_mismatch("x", [same, same], [0, 1]) is None
    fields = [dict(hidden_size=32, top_k=2), dict(hidden_size=48, top_k=3), dict(hidden_size=32, top_k=2),
              dict(hidden_size=32, top_k=2)]
    assert describe_mismatch("MoELayer 'ffn'", fields, [4, 5, 6, 7]) == \
        "MoELayer 'ffn': ranks disagree on hidden_size: ranks 4, 6, 7 have 32, rank 5 has 48"
    assert describe_mismatch("x", [dict(a=1), dict(a=1, b="z")], [0, 1]) == \
        "x: ranks disagree on b: rank 0 has <missing>, rank 1 has 'z'"


@pytest.mark.parametrize("config,ep_size,nodes,match", [
    (dict(n_routed_experts=4), 3, 1, "n_routed_experts=4 is not divisible by ep_size=3"),
    (dict(n_routed_experts=24, topk_method="device_limited", n_group=4, topk_group=2), 6, 1,
     "n_group=4 and ep_size=6: one must divide the other"),
    (dict(n_routed_experts=8, num_experts_per_tok=2, topk_method="node_limited", n_group=4, topk_group=2), 4, 2,
     "n_group=4 must equal the 2 nodes"),
    (dict(n_routed_experts=8, device_groups=4), 2, 1, "device_groups=4 must equal ep_size=2"),
])
def test_placement_errors_name_the_sizes(config, ep_size, nodes, match):
    from moe_ep import ParallelState

    cfg = MoEConfig(**dict(BASE, **config))
    with pytest.raises(ValueError, match=match):  # no process group: built as one rank's shard would be offline
        MoELayer(cfg, ParallelState(ep_size=ep_size, nodes=nodes))


def test_timeout_must_be_positive():
    assert as_timedelta(2.5) == timedelta(seconds=2.5)
    assert as_timedelta(timedelta(minutes=1)) == timedelta(minutes=1)
    with pytest.raises(ValueError, match="positive"):
        as_timedelta(0)


@pytest.mark.parametrize("param,where", [("router.weight", "router logits"), ("experts.w_out", "expert outputs")])
def test_check_finite_names_the_layer_the_forward_and_the_place(param, where):
    layer = MoELayer(MoEConfig(**BASE), name="layers.2.ffn")
    x = torch.randn(2, 4, 16)
    layer(x)
    with torch.no_grad():
        layer.get_parameter(param).fill_(float("inf"))
    with pytest.raises(NonFiniteError) as info:
        layer.eval()(x)
    message = str(info.value)
    assert message.startswith("MoELayer 'layers.2.ffn', forward 2 (eval): NaN or Inf in "), message
    assert f"{where}: " in message and "input:" not in message
    if where == "expert outputs":
        assert "router logits" not in message


def test_model_names_its_moe_layers():
    from moe_ep.models import ModelConfig, MoETransformerLM

    model = MoETransformerLM(ModelConfig.preset("tiny"))
    assert [m.name for m in moe_layers(model)] == [f"layers.{i}.ffn" for i in range(model.config.first_k_dense,
                                                                                   model.config.n_layers)]
    assert all(model.get_submodule(m.name) is m for m in moe_layers(model))


def _stats(routed: int, processed: int, dropped: int) -> RoutingStats:
    t = torch.tensor
    return RoutingStats(tokens_per_expert=t([routed, 0]), routed_pairs=t(routed), dropped_pairs=t(dropped),
                        processed_pairs=t(processed), max_violation=t(1.0), devices_per_token_mean=t(1.0),
                        devices_per_token_max=t(1), traffic={})


def test_metrics_record_pairs_and_catch_a_lost_pair():
    from moe_ep import ParallelState

    meter = IntervalMeter(2, 2, tokens_per_step=8, device=torch.device("cpu"))
    zero = torch.zeros(())
    meter.add(StepResult(zero, zero, zero, [[_stats(16, 12, 4), _stats(16, 16, 0)]], lr=1e-3))
    meter.add(StepResult(zero, zero, zero, [[_stats(8, 8, 0)], [_stats(8, 6, 2)]], lr=1e-3))  # 2 micro-batches
    record = meter.flush(ParallelState())
    assert (record["routed_pairs"], record["processed_pairs"], record["dropped_pairs"]) == (48, 42, 6)
    meter.add(StepResult(zero, zero, zero, [[_stats(16, 11, 4)]], lr=1e-3))  # one pair neither processed nor dropped
    with pytest.raises(RuntimeError, match="pairs lost: 16 routed but 11 processed"):
        meter.flush(ParallelState())

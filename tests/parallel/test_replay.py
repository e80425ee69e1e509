"""Router replay under expert parallelism (gloo, ep 2): each rank records its own tokens, and replaying a
one-process record's rows at ep 2 equals the one-process replay (outputs, dropping, router gradients)."""
import pytest
import torch
import torch.distributed as dist

import moe_ep
from moe_ep.model_moe import moe_layers
from moe_ep.models import MoETransformerLM
from moe_ep.parallel.spawn import run_on_ranks

from ..test_replay import ids, perturb_routers, small_config

pytestmark = pytest.mark.timeout(180)


def _worker(rank: int, world: int) -> dict:
    state = moe_ep.init_expert_parallel(ep_size=2)
    batch, shard = ids(), slice(2 * rank, 2 * rank + 2)
    rows = slice(rank * batch[shard].numel(), (rank + 1) * batch[shard].numel())  # this rank's tokens
    one = MoETransformerLM(small_config(), seed=0).train()
    ep = MoETransformerLM(small_config(), state, seed=0).train()
    with moe_ep.record_routing(one) as rec:
        one(batch)
    with moe_ep.record_routing(ep) as mine:
        ep(batch[shard])
    out = {"record": all(torch.equal(mine.experts[k], rec.experts[k][rows]) for k in rec.experts)}

    perturb_routers(one)
    perturb_routers(ep)
    grad_out = torch.randn(4, 16, 256, generator=torch.Generator().manual_seed(3))
    with moe_ep.replay_routing(one, rec):
        logits = one(batch)
    (logits * grad_out).sum().backward()
    with moe_ep.replay_routing(ep, {k: t[rows] for k, t in rec.experts.items()}):
        ep_logits = ep(batch[shard])
    (ep_logits * grad_out[shard]).sum().backward()
    out["logits"] = (ep_logits - logits[shard]).abs().max().item()
    for layer, ep_layer in zip(moe_layers(one), moe_layers(ep)):
        grad = ep_layer.router.weight.grad.clone()
        dist.all_reduce(grad)  # the sum of the ranks' objectives is the one-process objective
        out[f"{layer.name}.router"] = (grad - layer.router.weight.grad).abs().max().item()
        out[f"{layer.name}.dropped"] = (ep_layer.last_stats.as_dict()["dropped_pairs"],
                                        layer.last_stats.as_dict()["dropped_pairs"])
    return out


def test_replay_at_ep2_equals_one_process():
    for out in run_on_ranks(_worker, 2, timeout=150):
        assert out.pop("record"), "a rank's record differs from the one-process record's rows of its tokens"
        for key, value in out.items():
            if key.endswith(".dropped"):
                assert value[0] == value[1] > 0, (key, value)
            else:
                assert value < 1e-5, (key, value)

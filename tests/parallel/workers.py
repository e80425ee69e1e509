"""Workers for expert-parallel tests other than the equivalence sweep."""
from __future__ import annotations

import torch
import torch.distributed as dist

import moe_ep
from moe_ep import MoEConfig, MoELayer


def bias_after_steps(rank: int, world: int, config: dict, ep_size: int, steps: int) -> dict:
    """Train-mode forwards + ``update_bias`` on random data; returns the bias bytes and the reference's."""
    cfg = MoEConfig(**config)
    state = moe_ep.init_expert_parallel(ep_size=ep_size)
    torch.manual_seed(0)
    ref = MoELayer(cfg)
    layer = MoELayer(cfg, parallel=state)
    layer.load_full_state_dict(ref.state_dict())
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        sizes = torch.randint(1, 4, (world,), generator=gen).tolist()
        x_full = torch.randn(sum(sizes), 8, cfg.hidden_size, generator=gen) * (1 + step)
        start = sum(sizes[:rank])
        with torch.no_grad():
            layer(x_full[start:start + sizes[rank]])
            ref(x_full)
        layer.update_bias()
        ref.update_bias()
    bias = layer.router.e_score_correction_bias
    # plain lists: tensors cannot outlive the worker process through the result queue
    return {"bias": bias.tolist(), "ref_bias": ref.router.e_score_correction_bias.tolist()}


def full_state_round_trip(rank: int, world: int, config: dict, ep_size: int) -> bool:
    """full_state_dict() equals the single-process state dict; load_full_state_dict shards it."""
    cfg = MoEConfig(**config)
    state = moe_ep.init_expert_parallel(ep_size=ep_size)
    torch.manual_seed(7)
    ref = MoELayer(cfg)
    layer = MoELayer(cfg, parallel=state)
    layer.load_full_state_dict(ref.state_dict())
    full = layer.full_state_dict()
    ref_sd = ref.state_dict()
    assert set(full) == set(ref_sd), f"keys differ: {set(full) ^ set(ref_sd)}"
    for key, value in ref_sd.items():
        assert full[key].shape == value.shape, f"{key}: {full[key].shape} != {value.shape}"
        assert torch.equal(full[key], value), f"{key} differs"
    first, last = state.expert_range(cfg.n_routed_experts)
    assert torch.equal(layer.experts.w_in, ref.experts.w_in[first:last])
    return True


def traffic(rank: int, world: int, config: dict) -> dict:
    """last_stats of one forward with device-limited routing on ``world`` EP ranks."""
    cfg = MoEConfig(**config)
    state = moe_ep.init_expert_parallel(ep_size=world)
    torch.manual_seed(3)
    layer = MoELayer(cfg, parallel=state)
    layer.load_full_state_dict(MoELayer(cfg).state_dict())
    torch.manual_seed(100 + rank)
    layer(torch.randn(4, 16, cfg.hidden_size))
    stats = layer.last_stats.as_dict()
    sent = torch.tensor([stats["rows_sent"]])
    dist.all_reduce(sent)
    stats["rows_sent_total"] = sent.item()
    received = torch.tensor([stats["rows_received"]])
    dist.all_reduce(received)
    stats["rows_received_total"] = received.item()
    return stats


def low_precision_forward(rank: int, world: int, config: dict, dtype_name: str) -> float:
    """Relative output error of a sharded layer in ``dtype`` against the single-process one."""
    dtype = getattr(torch, dtype_name)
    cfg = MoEConfig(**config)
    state = moe_ep.init_expert_parallel(ep_size=world)
    torch.manual_seed(11)
    ref = MoELayer(cfg).to(dtype)
    layer = MoELayer(cfg, parallel=state).to(dtype)
    layer.load_full_state_dict(ref.state_dict())
    x_full = torch.randn(2 * world, 8, cfg.hidden_size).to(dtype)
    x_r = x_full[2 * rank:2 * rank + 2].clone().requires_grad_()
    y_r = layer(x_r)
    y_r.float().square().sum().backward()
    assert y_r.dtype == dtype and x_r.grad.dtype == dtype
    expected = ref(x_full)[2 * rank:2 * rank + 2]
    return ((y_r.float() - expected.float()).abs().max() / expected.float().abs().max()).item()

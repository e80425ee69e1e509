"""Worker: the sync-free layer at ep > 1 against the single-process sync-free layer on each rank's own tokens.

The capacity of the padded dispatcher is per sender, so rank r's pairs are kept or dropped exactly as a
single-process layer would keep or drop them on rank r's tokens alone: its outputs, input gradients and
router/shared gradients equal that layer's, the expert gradients the sum over ranks of those layers' (the
objective is ``sum(y * g)``: the aux loss couples the ranks through global counts), and the dropped pairs the
sum over ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import moe_ep
from moe_ep import MoEConfig, MoELayer


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / (1 + want.abs().max())).item()


def per_sender_equivalence(rank: int, world: int, config: dict, steps: int) -> dict:
    cfg = MoEConfig(**config)
    state = moe_ep.init_expert_parallel(ep_size=world)
    torch.manual_seed(5)
    reference = MoELayer(cfg.replace(device_groups=world))  # D device groups = the EP ranks, as sharded
    layer = MoELayer(cfg, parallel=state)
    layer.load_full_state_dict(reference.state_dict())
    errors, dropped = {}, []
    first, last = state.expert_range(cfg.n_routed_experts)
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 * step + rank)
        x, g = torch.randn(3, 8, cfg.hidden_size, generator=gen), torch.randn(3, 8, cfg.hidden_size, generator=gen)
        outs = []
        for module in (layer, reference):
            x_r = x.clone().requires_grad_()
            y = module(x_r)
            (y * g).sum().backward()
            outs.append((y, x_r.grad, dict(module.named_parameters())))
        (y, dx, params), (y_ref, dx_ref, ref_params) = outs
        found = {"output": _rel_err(y, y_ref), "input_grad": _rel_err(dx, dx_ref)}
        for name, param in params.items():
            want = ref_params[name].grad.clone()
            if name.startswith("experts."):
                dist.all_reduce(want)
                want = want[first:last]
            found[f"grad:{name}"] = _rel_err(param.grad, want)
        for name, value in found.items():
            errors[name] = max(errors.get(name, 0.0), value)
        ref_dropped = torch.tensor(reference.last_stats.as_dict()["dropped_pairs"])
        dist.all_reduce(ref_dropped)
        stats = layer.last_stats.as_dict()
        assert stats["processed_pairs"] + stats["dropped_pairs"] == stats["routed_pairs"], stats
        dropped.append((stats["dropped_pairs"], int(ref_dropped)))
        for module in (layer, reference):
            module.update_bias()
            module.zero_grad()
    return {"errors": errors, "dropped": dropped, "kind": layer.dispatcher.kind}

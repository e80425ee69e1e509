"""Worker: a distributed MoELayer against the single-process layer on the concatenated batch.

A case is a dict: ``config`` (MoEConfig fields, ``dispatcher`` included),
``ep_size``, optional ``nodes``, ``batch_per_rank``, ``seq_len``,
``skew_to_expert``, ``train``, ``double``, ``tol``, ``chunks``.

``chunks``: ``overlap_chunks`` values c > 1 whose layer must give this
rank's outputs, aux loss and local gradients of the c = 1 layer within
1e-6 (relative to their magnitude): the pipelined dispatch changes no
decision, only the order of floating-point sums.

Every rank builds the same single-process reference (same seed), shards its
full state dict into the distributed layer, and runs both. Objective per rank:
``sum(y_r * g_r) + aux_loss / W`` (see moe_ep/balance.py for why ``/ W``), so
the gradients summed over ranks equal the reference gradients of
``sum(y * g) + aux_loss``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import moe_ep
from moe_ep import MoEConfig, MoELayer


_STATES: dict = {}


def _state(ep_size: int, nodes):
    if (ep_size, nodes) not in _STATES:
        _STATES[ep_size, nodes] = moe_ep.init_expert_parallel(ep_size=ep_size, nodes=nodes)
    return _STATES[ep_size, nodes]


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / (1 + max |expected|): fp32 round-off scales with magnitude."""
    if expected.numel() == 0:
        return 0.0
    return ((got - expected).abs().max() / (1 + expected.abs().max())).item()


def _batch_sizes(case: dict, world: int) -> list[int]:
    return case.get("batch_per_rank", [2] * world)


def run_case(rank: int, world: int, case: dict) -> dict:
    """Compare one configuration; returns max errors (asserted by the caller and here)."""
    # The reference must use the same D device groups as the sharded layer; ``reference_overrides``
    # changes fields of the reference only (e.g. another expert backend).
    cfg = MoEConfig(**{"device_groups": case["ep_size"], **case["config"]})
    ref_cfg = cfg.replace(**case.get("reference_overrides", {}))
    state = _state(case["ep_size"], case.get("nodes"))
    seq_len, H = case.get("seq_len", 8), cfg.hidden_size
    sizes = _batch_sizes(case, world)

    torch.manual_seed(1234)
    ref = MoELayer(ref_cfg).double() if case.get("double") else MoELayer(ref_cfg)
    if cfg.aux_free_bias:
        ref.router.e_score_correction_bias.uniform_(-0.05, 0.05)
    dtype = torch.float64 if case.get("double") else torch.float32
    x_full = torch.randn(sum(sizes), seq_len, H, dtype=dtype)
    if case.get("skew_to_expert") is not None:
        with torch.no_grad():  # every token prefers one expert by a wide margin
            ref.router.weight.zero_()
            ref.router.weight[case["skew_to_expert"]] = 1.0
        x_full = x_full.abs() + 0.1
    g_full = torch.randn_like(x_full)

    layer = MoELayer(cfg, parallel=state).to(dtype)
    layer.load_full_state_dict(ref.state_dict())
    train = case.get("train", True)
    ref.train(train)
    layer.train(train)

    start = sum(sizes[:rank])
    x_r = x_full[start:start + sizes[rank]].clone().requires_grad_()
    x_ref = x_full.clone().requires_grad_()

    y_ref = ref(x_ref)
    (y_ref * g_full).sum().add(ref.aux_loss).backward()
    y_r = layer(x_r)
    (y_r * g_full[start:start + sizes[rank]]).sum().add(layer.aux_loss / world).backward()

    errors = {
        "output": _rel_err(y_r, y_ref[start:start + sizes[rank]]),
        "aux_loss": _rel_err(layer.aux_loss, ref.aux_loss),
        "input_grad": _rel_err(x_r.grad, x_ref.grad[start:start + sizes[rank]]),
    }
    first, last = state.expert_range(cfg.n_routed_experts)
    ref_params = dict(ref.named_parameters())
    for name, param in layer.named_parameters():
        grad = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
        if name.startswith("experts."):
            dist.all_reduce(grad, group=state.edp_group)
            expected = ref_params[name].grad[first:last]
        else:
            dist.all_reduce(grad)
            expected = ref_params[name].grad
        errors[f"grad:{name}"] = _rel_err(grad, expected)
    for chunks in case.get("chunks", ()):
        errors.update(_chunked_errors(cfg.replace(overlap_chunks=chunks), state, ref, layer, x_r, y_r,
                                      g_full[start:start + sizes[rank]], world, train))
    stats, ref_stats = layer.last_stats.as_dict(), ref.last_stats.as_dict()
    for key in ("tokens_per_expert", "routed_pairs", "dropped_pairs", "processed_pairs", "devices_per_token_max"):
        assert stats[key] == ref_stats[key], f"rank {rank}: last_stats[{key}] {stats[key]} != {ref_stats[key]}"
    tol = case.get("tol", 2e-5)
    bad = {k: v for k, v in errors.items() if not v <= (1e-6 if k.startswith("chunks") else tol)}
    assert not bad, f"rank {rank}: errors above {tol}: {bad}"
    with torch.no_grad():  # this rank's routing, for traffic bounds checked by the caller
        topk_idx = layer.router(x_r.reshape(-1, H)).topk_idx_TK
    return {"errors": errors, "stats": stats, "dispatcher": layer.dispatcher.kind,
            "topk_idx": topk_idx.tolist()}


def _chunked_errors(cfg: MoEConfig, state, ref: MoELayer, layer: MoELayer, x_r: torch.Tensor, y_r: torch.Tensor,
                    g_r: torch.Tensor, world: int, train: bool) -> dict:
    """Relative errors of the ``cfg.overlap_chunks`` layer against ``layer`` (c = 1: output ``y_r`` for ``x_r``,
    after its backward)."""
    chunked = MoELayer(cfg, parallel=state).to(x_r.dtype).train(train)
    chunked.load_full_state_dict(ref.state_dict())
    x_c = x_r.detach().clone().requires_grad_()
    y_c = chunked(x_c)
    (y_c * g_r).sum().add(chunked.aux_loss / world).backward()
    tag = f"chunks{cfg.overlap_chunks}"
    errors = {f"{tag}:output": _rel_err(y_c, y_r), f"{tag}:aux_loss": _rel_err(chunked.aux_loss, layer.aux_loss),
              f"{tag}:input_grad": _rel_err(x_c.grad, x_r.grad)}
    for (name, param), one in zip(chunked.named_parameters(), layer.parameters()):
        if one.grad is not None:
            errors[f"{tag}:grad:{name}"] = _rel_err(param.grad, one.grad)
    return errors


def run_cases(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """``run_case`` for several configurations in one process group (saves start-ups)."""
    out = []
    for case in cases:
        try:
            out.append(run_case(rank, world, case))
        except AssertionError as exc:
            raise AssertionError(f"case {case.get('name')}: {exc}") from exc
    return out

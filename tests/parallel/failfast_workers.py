"""Workers of tests/parallel/test_fail_fast.py: ranks that disagree, stop, see NaN, or drop pairs."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

import moe_ep
from moe_ep import MoEConfig, MoELayer
from moe_ep.finite import NonFiniteError
from moe_ep.training.metrics import IntervalMeter
from moe_ep.training.step import StepResult

SMALL = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2)


def _timeout_s(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def _error(fn) -> str | None:
    """``str`` of the ``ValueError`` that ``fn()`` raises, None if it returns."""
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


def disagreeing_ranks(rank: int, world: int) -> dict:
    """Rank-dependent ep_size, then hidden sizes 32 / 48: each raises on every rank; then the ranks still work."""
    layout_error = _error(lambda: moe_ep.init_expert_parallel(ep_size=2 if rank == 0 else 1))
    divide_error = _error(lambda: moe_ep.init_expert_parallel(ep_size=3))  # the same on every rank, but wrong
    state = moe_ep.init_expert_parallel(ep_size=2, timeout=7.0)
    timeouts = {name: _timeout_s(g) for name, g in
                (("world", dist.group.WORLD), ("ep", state.ep_group), ("dp", state.edp_group))}
    config_error = _error(lambda: MoELayer(MoEConfig(**dict(SMALL, hidden_size=32 if rank == 0 else 48)),
                                           parallel=state, name="layers.1.ffn"))
    layer = MoELayer(MoEConfig(**SMALL), parallel=state)  # same config: no error, and the group still works
    y = layer(torch.randn(3, 4, SMALL["hidden_size"]))
    return dict(layout_error=layout_error, divide_error=divide_error, config_error=config_error, timeouts=timeouts,
                y_shape=list(y.shape))


def one_rank_stops(rank: int, world: int, how: str, flag: str, timeout_s: float) -> dict:
    """After building a layer together, rank 1 stops taking part; rank 0's forward must fail, not wait.

    ``how``: ``sleeps`` (rank 1 stays alive, idle, until rank 0 has failed)
    or ``exits`` (rank 1 returns and its process ends).
    """
    state = moe_ep.init_expert_parallel(ep_size=2, timeout=timeout_s)
    layer = MoELayer(MoEConfig(**SMALL), parallel=state)
    if rank == 1:
        if how == "sleeps":
            deadline = time.monotonic() + 120
            while not Path(flag).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        return {}
    start = time.monotonic()
    try:
        layer(torch.randn(2, 8, SMALL["hidden_size"]))
        error = None
    except RuntimeError as exc:
        error = f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - start
    Path(flag).touch()
    return dict(error=error, elapsed=elapsed)


def nonfinite_logits_on_one_rank(rank: int, world: int) -> dict:
    """Rank 1's input overflows the router logits (the input itself is finite); both ranks must raise."""
    state = moe_ep.init_expert_parallel(ep_size=2)
    layer = MoELayer(MoEConfig(**SMALL, check_finite=True), parallel=state, name="layers.3.ffn")
    x = torch.randn(2, 8, SMALL["hidden_size"])
    layer(x)  # forward 1: finite everywhere
    bad = x.clone()
    if rank == 1:
        bad[0, 0] = 3e38 * torch.sign(layer.router.weight[0].detach())  # logit of expert 0 > fp32 max
    message = None
    try:
        layer(bad)  # forward 2
    except NonFiniteError as exc:
        message = str(exc)
    layer(x)  # forward 3: every rank raised at the same point, so the collectives are still in step
    return dict(message=message, input_finite=bool(torch.isfinite(bad).all()))


def skewed_dropping_metrics(rank: int, world: int, steps: int) -> dict:
    """Training forwards of two MoE layers with all tokens routed to one device and a device capacity of 1.0.

    Every rank feeds the layers' stats to an ``IntervalMeter`` like the
    launchers do; returns the record of ``flush`` and the tokens this rank
    routed.
    """
    state = moe_ep.init_expert_parallel(ep_size=world)
    cfg = MoEConfig(**dict(SMALL, n_routed_experts=8), device_capacity_factor=1.0)
    layers = [MoELayer(cfg, parallel=state, name=f"layers.{i}.ffn").train() for i in range(2)]
    for layer in layers:
        with torch.no_grad():  # every token's top-2 are experts 0 and 1, both on EP rank 0
            layer.router.weight.zero_()
            layer.router.weight[:2] = torch.tensor([[1.0], [0.9]])
    meter = IntervalMeter(len(layers), cfg.n_routed_experts, tokens_per_step=0, device=torch.device("cpu"))
    tokens = 0
    zero = torch.zeros(())
    for step in range(steps):
        batch = 1 + (rank + step) % 3  # uneven token counts across ranks and steps
        x = torch.randn(batch, 8, cfg.hidden_size).abs() + 0.1
        meter.begin_step()
        with torch.no_grad():
            for layer in layers:
                layer(x)
        meter.add(StepResult(zero, zero, zero, [[layer.last_stats for layer in layers]], lr=0.0))
        tokens += batch * 8
    return dict(record=meter.flush(state), tokens=tokens)

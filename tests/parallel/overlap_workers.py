"""Rank functions of tests/parallel/test_overlap.py: emulated links and the pipelined dispatcher."""
from __future__ import annotations

import time

import torch

import moe_ep
from moe_ep.dispatch import make_dispatcher
from moe_ep.dispatch.exchange import exchange
from moe_ep.parallel.links import LinkRoute, emulated_links


def timed_exchange(rank: int, world: int, seconds: float) -> dict:
    """One all-to-all of 1 MiB to the other rank (2 emulated nodes) on a link that needs ``seconds`` for it."""
    state = moe_ep.init_expert_parallel(ep_size=world, nodes=world)
    rows, width = 1024, 256                                    # 1 MiB of fp32 per rank
    x = torch.arange(rows * width, dtype=torch.float32).view(rows, width) + 1e6 * rank
    split = [rows // world] * world
    route = LinkRoute(tuple(d == rank for d in range(world)), rank)
    plain = exchange(x, split, split, state.ep_group)
    remote_bytes = rows // world * width * 4
    with emulated_links(intranode_GBps=1.0, internode_GBps=remote_bytes / seconds / 1e9) as links:
        start = time.perf_counter()
        delayed = exchange(x, split, split, state.ep_group, route, "probe")
        elapsed = time.perf_counter() - start
    return dict(elapsed=elapsed, equal=torch.equal(plain, delayed), exposed=links.exposed_s,
                events=[event[0] for event in links.events])


class _SleepingFFN(torch.autograd.Function):
    """y_S = sum over rows r of s: weight_r * x_S[s]; forward and backward each sleep ``seconds`` (emulated compute)."""

    @staticmethod
    def forward(ctx, x_SH, row_R, weight_R, seconds):
        time.sleep(seconds)
        ctx.save_for_backward(x_SH, row_R, weight_R)
        ctx.seconds = seconds
        return torch.zeros_like(x_SH).index_add_(0, row_R, x_SH[row_R] * weight_R[:, None])

    @staticmethod
    def backward(ctx, dy_SH):
        x_SH, row_R, weight_R = ctx.saved_tensors
        time.sleep(ctx.seconds)
        dx = torch.zeros_like(x_SH).index_add_(0, row_R, dy_SH[row_R] * weight_R[:, None])
        return dx, None, (dy_SH[row_R] * x_SH[row_R]).sum(1), None


class SleepingExperts:
    """Experts whose compute is a sleep of ``seconds_per_row`` per (row, expert) pair, forward and backward."""

    def __init__(self, num_local_experts: int, seconds_per_row: float):
        self.num_local_experts, self.seconds_per_row = num_local_experts, seconds_per_row

    def __call__(self, x_SH, row_R, counts_E, weight_R, shared_grads=None):
        return _SleepingFFN.apply(x_SH, row_R, weight_R, self.seconds_per_row * row_R.numel())

    def share_weight_grads(self, dtype):
        return None  # no weights


def hidden_by_chunks(rank: int, world: int, chunks: list[int], compute_s: float) -> dict:
    """The exposed link time of a forward+backward through the flat dispatcher (2 emulated nodes) per chunk count.

    Each rank routes 512 tokens of width 256 to one expert each, half of them on the other rank; the link is set
    so that one direction's remote rows take ``compute_s / 2``, as long as the (sleeping) experts' forward.
    """
    state = moe_ep.init_expert_parallel(ep_size=world, nodes=world)
    T, H, E = 512, 256, 2 * world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=g)
    idx = torch.randint(0, E, (T, 1), generator=g)
    weight = torch.rand(T, 1, generator=g)
    remote_bytes = int((idx // (E // world) != rank).sum()) * H * 4
    speed = remote_bytes / (compute_s / 2) / 1e9
    experts = SleepingExperts(E // world, compute_s / T)
    out = {}
    for c in chunks:
        dispatcher = make_dispatcher("flat", state, E, chunks=c)
        xx, ww = x.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.distributed.barrier()
        with emulated_links(intranode_GBps=speed, internode_GBps=speed) as links:
            start = time.perf_counter()
            y = dispatcher(xx, idx, ww, None, None, experts).y_TH
            forward_exposed = links.exposed_s
            y.square().sum().backward()
            elapsed = time.perf_counter() - start
        out[c] = dict(forward_exposed=forward_exposed, exposed=links.exposed_s, elapsed=elapsed,
                      y=y.detach(), dx=xx.grad, dw=ww.grad)
    ref = out[chunks[0]]
    return {c: dict(forward_exposed=r["forward_exposed"], exposed=r["exposed"], elapsed=r["elapsed"],
                    err=max((r[k] - ref[k]).abs().max().item() for k in ("y", "dx", "dw")))
            for c, r in out.items()}


def weight_pass_timing(rank: int, world: int, chunks: int) -> dict:
    """When the chunks' shared weight-gradient pass runs in a layer's backward, against the backward's transfers.

    A real ``MoELayer`` (flat dispatch over 2 emulated nodes, ``chunks`` chunks) runs forward+backward on links
    slow enough (20 ms latency) that every transfer outlasts the compute; returns the pass's start and every
    backward transfer's issue and end times.
    """
    from moe_ep import expert_ffn

    state = moe_ep.init_expert_parallel(ep_size=world, nodes=world)
    torch.manual_seed(0)
    cfg = moe_ep.MoEConfig(hidden_size=32, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
                           overlap_chunks=chunks)
    layer = moe_ep.MoELayer(cfg, state)
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    starts = []
    weight_backward = expert_ffn._WeightGradPass.backward

    def timed(ctx, *grads):
        starts.append(time.perf_counter())
        return weight_backward(ctx, *grads)

    expert_ffn._WeightGradPass.backward = staticmethod(timed)
    try:
        torch.distributed.barrier()
        with emulated_links(intranode_GBps=1.0, internode_GBps=1.0, latency_us=20_000) as links:
            layer(x).square().sum().backward()
    finally:
        expert_ffn._WeightGradPass.backward = weight_backward
    backward = [(issued, end) for label, issued, _, end in links.events if label.endswith(".backward")]
    return dict(starts=starts, backward=backward, grads=all(p.grad is not None for p in layer.parameters()))

"""The all-to-all hidden behind the experts: serialized (overlap_chunks = 1) against pipelined (2, 4) MoE layer steps.

    python benchmarks/bench_overlap.py --json docs/data/bench_overlap_cpu.json --plot docs/img
    python benchmarks/bench_overlap.py --quick            # < 3 min on 2 cores

Communication here is loopback gloo, nearly free, so every number is measured under **emulated links**
(``moe_ep.parallel.emulated_links``): a collective completes no earlier than latency + bytes / bandwidth after
it starts, per link class (docs/dispatch.md, "Overlap"). The speeds keep the compute-to-bandwidth ratios of a
DeepSeek-V3 training cluster (shared/reference/published-figures.md):

    GEMM rate       989 TFLOP/s dense bf16 (H100/H800) x 0.7 reached by real GEMMs   = 692 TFLOP/s
    intra-node      155 GB/s  (DeepEP's measured NVLink all-to-all, 153-158 GB/s)   -> 4465 FLOP per byte
    inter-node       50 GB/s  (ConnectX-7 400 Gb/s per GPU; DeepEP 43-58 GB/s RDMA)  -> 13840 FLOP per byte

applied to this CPU's GEMM rate G (measured on every rank at once, on the expert GEMM's shape):
``intranode_GBps = G / 4465 / 1e9``, ``internode_GBps = G / 13840 / 1e9``. The latency keeps its share of a
layer: DeepEP's 77 us (low-latency dispatch, EP 8) is to a V3 layer's expert forward on an H100 (4096 tokens
per rank: 2.9 TFLOP, 4.2 ms at 692 TFLOP/s) what the emulated latency is to this layer's expert forward at G.
The layer has DeepSeek-V3's
expert shape (width 2048, top-8) at a smaller hidden size (communication and expert compute both scale with
it), for which communication alone takes about the experts' compute time at these ratios.

Layouts: ep 2 as 2 emulated nodes of one rank (every remote row crosses the inter-node link; flat dispatcher)
and 2 emulated nodes x 2 ranks (4 processes; two-hop dispatcher). For each, forward and forward+backward,
every schedule is timed with iterations interleaved (``bench_measure``), and per schedule:

    compute_ms       the same step with the links off (loopback gloo: the work alone)
    comm_ms          the same step under the links with experts that cost nothing (same rows moved)
    step_ms          the step under the links
    exposed_comm_ms  step_ms - compute_ms
    max_err          outputs and gradients against overlap_chunks = 1, relative to their magnitude

``--plot DIR`` also draws one forward+backward step of each schedule as a timeline (link transfers from the
emulated links' record, expert forward and backward from timestamps): bench_overlap_timeline.png.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time
from functools import partial

import torch

from bench_measure import forward_backward, forward_only, interleaved_samples, machine_description, over_ranks
from moe_ep import MoEConfig, MoELayer
from moe_ep import expert_ffn
from moe_ep.parallel.links import emulated_links
from moe_ep.parallel.spawn import run_on_ranks
from moe_ep.parallel.state import init_expert_parallel

H100_GEMM_FLOPS = 989e12 * 0.7
INTRANODE_BYTES_PER_S = 155e9
INTERNODE_BYTES_PER_S = 50e9
H100_LATENCY_S = 77e-6
V3_EXPERT_FORWARD_S = 4096 * 6 * 7168 * 2048 * 8 / H100_GEMM_FLOPS  # one V3 layer's routed experts, one rank
LAYOUTS = {"ep2": dict(ranks=2, nodes=2), "2x2": dict(ranks=4, nodes=2)}


class _Built:
    """A layer and its input on this rank; ``forward()`` returns the tensors to back-propagate through."""

    def __init__(self, layer: MoELayer, x_TH: torch.Tensor, grad_TH: torch.Tensor):
        self.layer, self.x_TH, self.grad_TH = layer, x_TH, grad_TH
        self.grad_outputs = (grad_TH,)

    def forward(self) -> tuple[torch.Tensor, ...]:
        return (self.layer(self.x_TH),)

    def zero_grad(self) -> None:
        self.layer.zero_grad(set_to_none=True)
        self.x_TH.grad = None


class _FreeExperts(torch.nn.Module):
    """Stands in for the routed experts in the communication-only step: ``y_S = sum_r weight_r * x_S[row_r]``."""

    def __init__(self, num_local_experts: int):
        super().__init__()
        self.num_local_experts = num_local_experts

    def forward(self, x_SH, row_R, counts_E, weight_R, shared_grads=None):
        return torch.zeros_like(x_SH).index_add_(0, row_R, x_SH[row_R] * weight_R.to(x_SH.dtype)[:, None])

    def share_weight_grads(self, dtype):
        return None  # no weights


def gemm_rate(hidden: int, ffn: int, rows: int, iters: int = 5) -> float:
    """FLOP/s of the expert's first GEMM ``[rows, H] @ [H, 2I]`` with every rank running it at once (the slowest rank)."""
    a, b = torch.randn(rows, hidden), torch.randn(hidden, 2 * ffn)
    torch.mm(a, b)
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b)
    rate = 2 * rows * hidden * 2 * ffn * iters / (time.perf_counter() - start)
    return -over_ranks([-rate], "max")[0]


def link_speeds(rate: float, expert_forward_flops: float, link_time: float = 1.0) -> dict:
    """The emulated links for a GEMM rate and this layer's expert forward FLOPs per rank (module docstring), every
    transfer taking ``link_time`` times as long (bandwidths divided by it, latency multiplied)."""
    scale = rate / H100_GEMM_FLOPS / link_time
    latency_s = H100_LATENCY_S * (expert_forward_flops / rate) / V3_EXPERT_FORWARD_S * link_time
    return dict(intranode_GBps=INTRANODE_BYTES_PER_S * scale / 1e9, internode_GBps=INTERNODE_BYTES_PER_S * scale / 1e9,
                latency_us=latency_s * 1e6)


def _max_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(((g - r).abs().max() / (1 + r.abs().max())).item() for g, r in zip(got, ref))


def _outputs(built: _Built) -> list[torch.Tensor]:
    """Output and every gradient of one forward+backward (then cleared)."""
    (y,) = built.forward()
    torch.autograd.backward(y, built.grad_outputs)
    out = [y.detach().clone(), built.x_TH.grad.clone()] + [p.grad.clone() for p in built.layer.parameters()]
    built.zero_grad()
    return out


def _timeline(built: _Built, speeds: dict) -> dict:
    """One forward+backward under the links: link transfers and expert compute intervals (seconds from the start)."""
    spans = []
    forward, backward = expert_ffn._ExpertFFN.forward, expert_ffn._ExpertFFN.backward
    weight_backward = expert_ffn._WeightGradPass.backward

    def timed(fn, label):
        def run(*args):
            start = time.perf_counter()
            out = fn(*args)
            spans.append((label, start, time.perf_counter()))
            return out
        return staticmethod(run)

    expert_ffn._ExpertFFN.forward = timed(forward, "experts")
    expert_ffn._ExpertFFN.backward = timed(backward, "experts.backward")
    expert_ffn._WeightGradPass.backward = timed(weight_backward, "experts.weight_grad")
    try:
        torch.distributed.barrier()
        with emulated_links(**speeds) as links:
            origin = time.perf_counter()
            forward_backward(built)
            end = time.perf_counter()
    finally:
        expert_ffn._ExpertFFN.forward, expert_ffn._ExpertFFN.backward = forward, backward
        expert_ffn._WeightGradPass.backward = weight_backward
    links_spans = [(label, begin - origin, stop - origin) for label, _, begin, stop in links.events]
    return dict(step_s=end - origin, links=links_spans, experts=[(l, a - origin, b - origin) for l, a, b in spans])


def run_layout(rank: int, world: int, nodes: int, args: dict) -> dict:
    torch.set_num_threads(1)
    state = init_expert_parallel(ep_size=world, nodes=nodes)
    H, I, E, K, T = args["hidden"], args["ffn"], args["experts"], args["top_k"], args["tokens"]
    rate = gemm_rate(H, I, T * K * world // E)
    speeds = link_speeds(rate, T * K * 6 * H * I, args["link_time"])
    torch.manual_seed(0)
    base = MoEConfig(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=g).requires_grad_()
    grad = torch.randn(T, H, generator=g)
    built, free = {}, {}
    for c in args["chunks"]:
        layer = MoELayer(base.replace(overlap_chunks=c), state)
        if built:
            layer.load_state_dict(next(iter(built.values())).layer.state_dict())
        built[c] = _Built(layer, x, grad)
        cheap = MoELayer(base.replace(overlap_chunks=c), state)
        cheap.experts = _FreeExperts(E // world)
        free[c] = _Built(cheap, x, grad)
    ref = _outputs(built[args["chunks"][0]])
    errors = {c: _max_err(_outputs(b), ref) for c, b in built.items()}

    def under_links(fn):
        def run():
            with emulated_links(**speeds):
                fn()
        return run

    records = []
    for mode, step in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
        steps = {}
        for c in args["chunks"]:
            steps[("step", c)] = under_links(partial(step, built[c]))
            steps[("compute", c)] = partial(step, built[c])
            steps[("comm", c)] = under_links(partial(step, free[c]))
        samples = interleaved_samples(steps, args["iters"], args["warmup"], torch.device("cpu"))
        medians = {key: statistics.median(w for w, _ in s) for key, s in samples.items()}
        values = over_ranks(list(medians.values()), "max")
        medians = dict(zip(medians, values))
        for c in args["chunks"]:
            step_ms, compute_ms, comm_ms = (medians[(k, c)] * 1e3 for k in ("step", "compute", "comm"))
            records.append(dict(schedule="serialized" if c == 1 else "overlapped", chunks=c, mode=mode, ep=world,
                                nodes=nodes, step_ms=step_ms, compute_ms=compute_ms, comm_ms=comm_ms,
                                exposed_comm_ms=step_ms - compute_ms, max_err=errors[c],
                                gemm_gflops=rate / 1e9, **speeds))
    timelines = {c: _timeline(built[c], speeds) for c in (args["chunks"][0], args["chunks"][-1])} \
        if args["plot"] else {}
    return dict(records=records, timelines=timelines)


def _table(records: list[dict]) -> None:
    head = ("layout", "mode", "schedule", "c", "step_ms", "compute_ms", "comm_ms", "exposed", "exposed/comm",
            "vs serial", "max_err")
    print(" | ".join(head))
    serial = {(r["ep"], r["nodes"], r["mode"]): r["step_ms"] for r in records if r["chunks"] == 1}
    for r in records:
        layout = "ep2" if r["ep"] == 2 else f"{r['nodes']}x{r['ep'] // r['nodes']}"
        print(" | ".join([layout, r["mode"], r["schedule"], str(r["chunks"]), f"{r['step_ms']:.1f}",
                          f"{r['compute_ms']:.1f}", f"{r['comm_ms']:.1f}", f"{r['exposed_comm_ms']:.1f}",
                          f"{r['exposed_comm_ms'] / r['comm_ms']:.2f}",
                          f"{r['step_ms'] / serial[(r['ep'], r['nodes'], r['mode'])]:.2f}", f"{r['max_err']:.1e}"]))


def plot_timelines(timelines: dict, path: pathlib.Path) -> pathlib.Path:
    """One panel per (layout, schedule): link transfers (dispatch, combine, their backward) and expert compute."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(layout, c, t) for layout, per_c in timelines.items() for c, t in sorted(per_c.items())]
    fig = Figure(figsize=(11, 2.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    lanes = ["link: dispatch", "link: combine", "link: backward", "experts", "experts.backward",
             "experts.weight_grad"]
    colors = dict(zip(lanes, ["tab:blue", "tab:orange", "tab:purple", "tab:green", "tab:olive", "tab:brown"]))
    for ax, (layout, c, t) in zip(axes, panels):
        for label, start, end in t["links"]:
            if label.endswith(".backward"):
                lane = "link: backward"
            elif ".combine" in label:
                lane = "link: combine"
            elif ".dispatch" in label or ".route" in label:
                lane = "link: dispatch"
            else:
                continue
            ax.broken_barh([(start * 1e3, (end - start) * 1e3)], (lanes.index(lane) - 0.4, 0.8),
                           color=colors[lane], alpha=0.6)
        for label, start, end in t["experts"]:
            ax.broken_barh([(start * 1e3, (end - start) * 1e3)], (lanes.index(label) - 0.4, 0.8), color=colors[label])
        ax.set_yticks(range(len(lanes)), labels=lanes)
        ax.set_xlim(0, t["step_s"] * 1e3)
        ax.set_title(f"{layout}, overlap_chunks={c} ({'serialized' if c == 1 else 'overlapped'}): one forward+backward, "
                     f"{t['step_s'] * 1e3:.0f} ms, rank 0, emulated links", fontsize=9)
    axes[-1].set_xlabel("ms from the start of the step")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=sorted(LAYOUTS))
    p.add_argument("--chunks", nargs="+", type=int, default=[1, 2, 4], help="overlap_chunks values; 1 first")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=2048, help="expert width (DeepSeek-V3's 2048)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="128 tokens per rank, 3 iterations")
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--plot", type=pathlib.Path, help="folder for bench_overlap_timeline.png")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--link-time", type=float, default=1.0,
                   help="every transfer this many times slower than the published ratios give (1.5: forward+backward "
                        "communication about its compute, as the forward's is at 1)")
    args = p.parse_args(argv)
    if args.chunks[0] != 1 or any(c < 1 for c in args.chunks):
        p.error("--chunks must start with 1 (the serialized reference) and be positive")
    if args.quick:
        args.tokens, args.iters = 128, 3
    cfg = dict(hidden=args.hidden, ffn=args.ffn, experts=args.experts, top_k=args.top_k, tokens=args.tokens,
               chunks=args.chunks, iters=args.iters, warmup=args.warmup, plot=args.plot is not None,
               link_time=args.link_time)
    records, timelines = [], {}
    for name in args.layouts:
        layout = LAYOUTS[name]
        result = run_on_ranks(run_layout, layout["ranks"], layout["nodes"], cfg, timeout=args.timeout)[0]
        records += result["records"]
        timelines[name] = result["timelines"]
    first = records[0]
    print(f"CPU GEMM rate {first['gemm_gflops']:.1f} GFLOP/s per rank -> emulated links: intra-node "
          f"{first['intranode_GBps'] * 1e3:.2f} MB/s, inter-node {first['internode_GBps'] * 1e3:.2f} MB/s, latency "
          f"{first['latency_us'] / 1e3:.2f} ms (published ratios, module docstring"
          f"{f'; transfers {args.link_time}x slower' if args.link_time != 1 else ''})")
    _table(records)
    machine = machine_description(torch.device("cpu"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([dict(r, machine=machine, spec=cfg) for r in records], indent=1) + "\n")
    if args.plot:
        args.plot.mkdir(parents=True, exist_ok=True)
        print(f"timeline: {plot_timelines(timelines, args.plot / 'bench_overlap_timeline.png')}")


if __name__ == "__main__":
    main()

"""Projection of a DeepSeek-V3-shaped MoE layer's step time on 8 to 256 GPUs, and its validation on CPU runs.

The model (one GPU's forward+backward of one layer; without overlap, then with ``overlap_chunks``):

    step     = comm + experts + shared + rest
    comm     = 4 passes (dispatch, combine, and their gradients) of the dispatcher's all-to-all:
        flat     pass = alpha_hop + imb * max(T r_intra B / bw_intra, T r_inter B / bw_inter)
        two-hop  pass = [alpha_inter + imb * T n_nodes B / bw_inter] + [alpha_intra + imb * T h2 B / bw_intra]
                 (moe_ep runs its two hops one after the other)
    experts  = roofline of the routed grouped GEMMs: max(F / (peak * eff), W / hbm),
               F = 3 (fwd+bwd) * 2 * imb * T K * H * 3I,  W = 3 reads of the E/G experts' weights
    shared   = 3 * 2 * T * H * 3 I_s / (peak * eff)
    rest     = router GEMM (3 * 2 T H E / (peak * eff)) + the row gathers and scatter-adds
               (10 passes of T K H bytes over HBM)

With ``--chunks c`` (default 4) each record also holds the step with the
chunked, pipelined dispatch of ``MoEConfig.overlap_chunks`` (``overlap_model``:
the routed experts, a third of their time forward and two thirds backward,
pipelined with the hops chunk by chunk in the order moe_ep issues them, each
chunk's all-to-all paying its start-up again; the shared expert and the rest
outside the pipeline, the grouped GEMMs assumed as efficient on c times fewer
rows): ``step_overlap_ms``, ``exposed_comm_overlap_ms`` (step minus compute),
``comm_share_overlap``.

with T tokens per GPU, row bytes B = H x dispatch bytes, and the routing
statistics measured from a trained router of ours (``router_stats.py``):
r_intra / r_inter the other GPUs of the node / of other nodes a token's
experts live on, n_nodes the remote nodes, h2 the rows the forwarding GPU
sends inside the destination nodes, imb the busiest GPU's pairs over the
mean. Hardware figures are the published ones (``HARDWARE``, each with its
source), the GEMM efficiency an assumption until GPU numbers of our
grouped-GEMM benchmark exist in docs/data (``--gemm-eff``).

    python benchmarks/project.py --stats docs/data/router_stats_v3mini256.json \\
        --json docs/data/projection_v3.json --plot docs/img
    python benchmarks/project.py --stats ... --validate docs/data/bench_scaling_cpu.json   # + CPU validation

``--validate`` fits the CPU parameters (gloo all-to-all alpha and bandwidth,
the GEMM rate, with 1, 2 and 4 processes sharing the cores) and predicts the
runs of ``bench_scaling.py`` with the same model (``project_fit.py``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
from dataclasses import asdict, dataclass

from overlap_model import Phase, split, step_time

HARDWARE = {  # value, source (../shared/reference/published-figures.md)
    "peak_flops": (989e12, "H100/H200 SXM dense bf16 tensor peak, NVIDIA data sheet"),
    "hbm_bw": (4.8e12, "H200 SXM HBM3e, NVIDIA data sheet (H100: 3.35 TB/s)"),
    "bw_intra": (155e9, "DeepEP normal kernels, intranode EP8 on H800: 153 GB/s dispatch, 158 GB/s combine (NVLink)"),
    "bw_inter": (50e9, "ConnectX-7 / InfiniBand NDR 400 Gb/s per GPU; DeepEP internode EP16-64: 43-58 GB/s (RDMA)"),
    "alpha_intra": (10e-6, "assumption: NVLink all-to-all start-up (DeepEP low-latency EP8: 77 us for 128 tokens x "
                           "top-8 incl. the transfer, an upper bound)"),
    "alpha_inter": (25e-6, "assumption: RDMA all-to-all start-up (DeepEP low-latency EP16-256: 118-194 us incl. "
                           "the transfer, an upper bound)"),
}
ROUTINGS = ("greedy", "device_limited", "node_limited")
DISPATCHES = ("flat", "two_hop")


@dataclass(frozen=True)
class Shape:
    """The projected layer (DeepSeek-V3): hidden, expert width, experts, top-K, shared experts, tokens per GPU."""

    hidden: int = 7168
    ffn: int = 2048
    experts: int = 256
    top_k: int = 8
    shared: int = 1
    tokens: int = 4096
    dispatch_bytes: int = 2  # bf16 rows both ways (DeepEP dispatches FP8: --dispatch-bytes 1)
    gpus_per_node: int = 8


def a2a_pass(alpha: float, bytes_by_link: list[tuple[float, float]]) -> float:
    """One all-to-all: ``alpha`` plus the slowest link's bytes / bandwidth (links run concurrently)."""
    return alpha + max((b / bw for b, bw in bytes_by_link), default=0.0)


def hop_passes(stats: dict, shape: Shape, hw: dict, dispatch: str) -> dict:
    """One pass of each hop of the route (seconds, whole batch), its start-up and link: the outer (first) hop and
    the inner one (two-hop route only)."""
    T, B, imb = shape.tokens, shape.hidden * shape.dispatch_bytes, stats["imbalance"]
    multi_node = stats["nodes"] > 1
    if dispatch == "flat":
        intra = imb * T * (stats["remote_ranks"] - stats["internode_ranks"]) * B
        inter = imb * T * stats["internode_ranks"] * B
        alpha = hw["alpha_inter"] if multi_node else hw["alpha_intra"]
        outer = a2a_pass(alpha, [(intra, hw["bw_intra"]), (inter, hw["bw_inter"])])
        return dict(outer=outer, alpha_outer=alpha, inner=0.0, alpha_inner=0.0,
                    outer_link="inter" if multi_node else "intra")
    inner = a2a_pass(hw["alpha_intra"], [(imb * T * stats["hop2_rows"] * B, hw["bw_intra"])])
    if not multi_node:
        return dict(outer=inner, alpha_outer=hw["alpha_intra"], inner=0.0, alpha_inner=0.0, outer_link="intra")
    outer = a2a_pass(hw["alpha_inter"], [(imb * T * stats["remote_nodes"] * B, hw["bw_inter"])])
    return dict(outer=outer, alpha_outer=hw["alpha_inter"], inner=inner, alpha_inner=hw["alpha_intra"],
                outer_link="inter")


def comm_time(stats: dict, shape: Shape, hw: dict, dispatch: str) -> float:
    """Seconds of the 4 all-to-all passes of a forward+backward (module docstring), the hops one after another."""
    hops = hop_passes(stats, shape, hw, dispatch)
    return 4 * (hops["outer"] + hops["inner"])


def overlapped_step(stats: dict, shape: Shape, hw: dict, dispatch: str, parts: dict, chunks: int) -> float:
    """Seconds of the step with ``overlap_chunks = chunks`` (``overlap_model``): the routed experts (1/3 of their
    time forward, 2/3 backward) pipelined with the hops; the shared expert and the rest outside the pipeline."""
    hops = hop_passes(stats, shape, hw, dispatch)

    def phase(share: float) -> Phase:
        return split(hops["outer"], hops["inner"], share * parts["experts"], chunks, hops["alpha_outer"],
                     hops["alpha_inner"], hops["outer_link"])
    return step_time(phase(1 / 3), phase(2 / 3), chunks) + parts["shared"] + parts["rest"]


def compute_times(stats: dict, shape: Shape, hw: dict, gemm_eff: float) -> dict:
    """Seconds of the routed experts (roofline), the shared expert and the rest (module docstring)."""
    H, I, T, K, G = shape.hidden, shape.ffn, shape.tokens, shape.top_k, stats["gpus"]
    rate = hw["peak_flops"] * gemm_eff
    flops = 3 * 2 * stats["imbalance"] * T * K * H * 3 * I
    weight_bytes = 3 * (shape.experts / G) * 3 * H * I * 2
    experts = max(flops / rate, weight_bytes / hw["hbm_bw"])
    shared = 3 * 2 * T * H * 3 * I * shape.shared / rate
    rest = 3 * 2 * T * H * shape.experts / rate + 10 * T * K * H * 2 / hw["hbm_bw"]
    return dict(experts=experts, shared=shared, rest=rest,
                experts_compute_bound=flops / rate >= weight_bytes / hw["hbm_bw"])


def project(stats_records: list[dict], shape: Shape, hw: dict, gemm_eff: float, balanced: bool,
            chunks: int = 4) -> list[dict]:
    """One record per (GPUs, routing, dispatch): the times in ms and the communication share, without overlap and
    with ``overlap_chunks = chunks`` (``step_overlap_ms``, the exposed communication then)."""
    out = []
    for stats in stats_records:
        stats = dict(stats, imbalance=1.0) if balanced else stats
        parts = compute_times(stats, shape, hw, gemm_eff)
        compute = parts["experts"] + parts["shared"] + parts["rest"]
        for dispatch in DISPATCHES:
            comm = comm_time(stats, shape, hw, dispatch)
            step = comm + compute
            overlapped = overlapped_step(stats, shape, hw, dispatch, parts, chunks)
            out.append(dict(gpus=stats["gpus"], nodes=stats["nodes"], routing=stats["routing"], M=stats["M"],
                            dispatch=dispatch, step_ms=step * 1e3, comm_ms=comm * 1e3,
                            experts_ms=parts["experts"] * 1e3, shared_ms=parts["shared"] * 1e3,
                            rest_ms=parts["rest"] * 1e3, comm_share=comm / step, imbalance=stats["imbalance"],
                            experts_compute_bound=parts["experts_compute_bound"], chunks=chunks,
                            step_overlap_ms=overlapped * 1e3, exposed_comm_overlap_ms=(overlapped - compute) * 1e3,
                            comm_share_overlap=(overlapped - compute) / overlapped))
    return out


def print_projection(records: list[dict], shape: Shape, hw_src: dict, gemm_eff: float, balanced: bool,
                     source: dict) -> None:
    print(f"DeepSeek-V3-shaped layer: hidden {shape.hidden}, expert width {shape.ffn}, {shape.experts} experts, "
          f"top-{shape.top_k}, {shape.shared} shared expert, {shape.tokens} tokens per GPU, {shape.gpus_per_node} GPUs "
          f"per node, rows {shape.dispatch_bytes} bytes per element; forward+backward; without overlap, and with "
          f"overlap_chunks={records[0]['chunks']} (the last three columns)")
    print("hardware figures (../shared/reference/published-figures.md):")
    for key, (value, src) in hw_src.items():
        print(f"  {key:<12}{value:>10.3g}  {src}")
    print(f"  gemm_eff    {gemm_eff:>10.2f}  ASSUMPTION: no GPU grouped-GEMM numbers in docs/data yet "
          f"(published: real GEMMs reach 60-80% of peak); --gemm-eff")
    print(f"routing statistics: {source.get('run')} ({source.get('tokens')} validation tokens), "
          f"{'imbalance set to 1 (--balanced)' if balanced else 'measured imbalance'}")
    print(f"\n{'GPUs':>5}{'nodes':>6}  {'routing':<16}{'M':>3}  {'dispatch':<9}{'step ms':>9}{'comm ms':>9}"
          f"{'experts':>9}{'shared':>8}{'rest':>7}{'comm %':>8}{'imb':>6}{'ovl ms':>9}{'exposed':>9}{'exp %':>7}")
    for r in records:
        print(f"{r['gpus']:>5}{r['nodes']:>6}  {r['routing']:<16}{r['M'] or '-':>3}  {r['dispatch']:<9}"
              f"{r['step_ms']:>9.1f}{r['comm_ms']:>9.1f}{r['experts_ms']:>9.1f}{r['shared_ms']:>8.1f}"
              f"{r['rest_ms']:>7.1f}{100 * r['comm_share']:>7.0f}%{r['imbalance']:>6.2f}"
              f"{r['step_overlap_ms']:>9.1f}{r['exposed_comm_overlap_ms']:>9.1f}{100 * r['comm_share_overlap']:>6.0f}%")


def plot_projection(records: list[dict], out_dir: str, suffix: str = "") -> pathlib.Path:
    """``projection_v3{suffix}.png``: step time and communication share against GPUs, a line per routing x dispatch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_c, ax_o) = plt.subplots(1, 3, figsize=(15, 4.2))
    for routing, color in zip(ROUTINGS, ("tab:blue", "tab:orange", "tab:green")):
        for dispatch, style in zip(DISPATCHES, ("-", "--")):
            pts = sorted((r["gpus"], r["step_ms"], 100 * r["comm_share"], r["step_overlap_ms"]) for r in records
                         if r["routing"] == routing and r["dispatch"] == dispatch)
            label = f"{routing}, {dispatch}"
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, marker="o", label=label)
            ax_c.plot([p[0] for p in pts], [p[2] for p in pts], style, color=color, marker="o", label=label)
            ax_o.plot([p[0] for p in pts], [p[3] for p in pts], style, color=color, marker="o", label=label)
    chunks = records[0]["chunks"]
    for ax, label in ((ax_t, "step time, fwd+bwd, no overlap (ms)"), (ax_c, "communication share, no overlap (%)"),
                      (ax_o, f"step time with overlap_chunks={chunks} (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (8 per node)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle("Projected DeepSeek-V3-shaped MoE layer (model, not a measurement)")
    fig.tight_layout()
    path = pathlib.Path(out_dir) / f"projection_v3{suffix}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stats", required=True, help="router_stats.py JSON (routing statistics of a trained router)")
    p.add_argument("--gemm-eff", type=float, default=0.6,
                   help="grouped-GEMM fraction of the bf16 peak (ASSUMPTION, default 0.6)")
    p.add_argument("--dispatch-bytes", type=int, default=2, help="bytes per element of the dispatched rows (2: bf16)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per GPU (default 4096)")
    p.add_argument("--balanced", action="store_true", help="set the imbalance to 1 (a perfectly balanced router)")
    p.add_argument("--chunks", type=int, default=4, help="overlap_chunks of the overlapped projection (default 4)")
    p.add_argument("--validate-overlap", default=None, metavar="BENCH_OVERLAP_JSON",
                   help="predict these bench_overlap.py runs with the overlap model (project_fit.validate_overlap)")
    for key, (value, _) in HARDWARE.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=float, default=value, help=f"default {value:g}")
    p.add_argument("--json", default=None, help="write the projection (and the validation) here")
    p.add_argument("--plot", default=None, help="write projection_v3.png (and projection_validation.png) here")
    p.add_argument("--validate", default=None, metavar="BENCH_SCALING_JSON",
                   help="fit CPU parameters here and predict these bench_scaling.py runs (project_fit.py)")
    args = p.parse_args(argv)
    if not 0 < args.gemm_eff <= 1:
        p.error("--gemm-eff must be in (0, 1]")
    if args.chunks < 1:
        p.error("--chunks must be a positive int")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    stats = json.loads(pathlib.Path(args.stats).read_text())
    shape = Shape(tokens=args.tokens, dispatch_bytes=args.dispatch_bytes)
    hw = {key: getattr(args, key) for key in HARDWARE}
    hw_src = {key: (hw[key], src) for key, (_, src) in HARDWARE.items()}
    records = project(stats["records"], shape, hw, args.gemm_eff, args.balanced, args.chunks)
    print_projection(records, shape, hw_src, args.gemm_eff, args.balanced, stats["source"])
    result = dict(shape=asdict(shape), hardware={k: dict(value=v, source=s) for k, (v, s) in hw_src.items()},
                  gemm_eff=args.gemm_eff, gemm_eff_is_assumption=True, balanced=args.balanced,
                  router=stats["source"], projection=records)
    if args.validate:
        from project_fit import validate

        result["validation"] = validate(json.loads(pathlib.Path(args.validate).read_text()), args.plot)
    if args.validate_overlap:
        from project_fit import validate_overlap

        result["overlap_validation"] = validate_overlap(json.loads(pathlib.Path(args.validate_overlap).read_text()))
    if args.plot:
        print(f"wrote {plot_projection(records, args.plot, '_balanced' if args.balanced else '')}")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

"""Expert-parallel load balancing (EPLB): per-rank load, inter-node rows and layer step time, with and without it.

    python benchmarks/bench_eplb.py --json docs/data/bench_eplb.json --plot docs/img
    python benchmarks/bench_eplb.py --quick            # fewer steps and timing rounds

**Inputs** (routed pairs per expert per step):

* ``zipf s``: each step's 8192 tokens pick K distinct experts each, drawn from ``p_e ~ rank(e)^-s`` (s = 0.8,
  1.2, 1.6) over a random order of the E experts (a token picks an expert at most once, so the loads are
  flatter than p); a fresh sample every step. E = 64, K = 6 on ``ep2`` and ``2x2``; E = 256, K = 8 (V3's
  shape) on ``4x8``.
* ``router``: a trained router's loads, ``expert_load`` of ``--router`` (``benchmarks/router_stats.py``:
  V3-mini's 256 experts, top-8, node-limited routing over 8 groups, after 300 training steps), every MoE
  layer, one step per chunk of 8192 validation tokens.
* ``drifting``: zipf 1.2 whose hot experts drift: every ``--drift-every`` steps the probabilities have moved,
  linearly, to those of an order in which a random expert among the 4 hottest traded places with a random
  expert.

**Placements** (``moe_ep.eplb``), at ``--redundant`` 0, 12.5 and 25 % extra slots:

* ``none``: expert e on rank e // (E / ranks), no EPLB;
* ``offline``: planned once from a calibration window (steps before the measured ones; for ``router``, its
  first chunk), then kept: how inference servers use EPLB;
* ``training``: planned from the same window at first, then re-planned every ``--interval`` steps from the
  last ``--interval`` steps' loads, adopted when it lowers their max/mean (``--eplb-interval``'s rule,
  ``moe_ep.eplb.balancer.compare_plans``).

**Measured**: per step, max/mean per-rank load (``moe_ep.eplb.rank_loads``: a replicated expert's pairs split
evenly, as ``Placement.slots`` splits them to within one pair per sender), averaged over the measured steps
and, for ``router``, over its layers; with ``training``'s placement also per node (the bound that keeping
groups and replicas in their node sets) and ``oracle``: a plan of the step's own loads (every
``--interval``-th step), what the planner reaches without predicting the loads, and ``hindsight``: one plan of
the mean of all measured steps, kept (a fixed placement knowable only afterwards: what remains above it
is the loads' step-to-step change, which no placement fixed before a step removes); inter-node rows per token (the two-hop dispatcher's: distinct remote
nodes of a token's experts, each token on a uniformly drawn rank) from token-level choices (``zipf``,
``drifting``: K distinct experts per token drawn from p; ``router``: its ``choices``). Expert groups kept
whole on one node: single experts for the greedy synthetic routing, V3's 8 routing groups for the router.
Layouts: ``ep2`` (1 node x 2 ranks), ``2x2`` (2 nodes x 2 ranks), ``4x8`` (4 nodes x 8 ranks: 256 experts
over 32 GPUs, 8 per GPU, where one hot expert alone can exceed a GPU's share; planner only).

**Layer step time** (``--time``): forward+backward of one MoE layer (64 experts, top-6) on ``ep2`` and ``2x2``
gloo processes whose routing is imposed (``MoELayer.routing_replay``) from zipf 1.2, every placement built
from the same weights and timed with iterations interleaved, **under emulated links**
(``moe_ep.parallel.emulated_links`` at the speeds of ``bench_overlap.link_speeds``: a V3 cluster's
compute-to-bandwidth ratios at this CPU's GEMM rate). Reported: the step's wall time (max over ranks of the
median), the busiest rank's CPU time, the realized max/mean of the pairs each rank's experts computed,
and the outputs' largest difference from ``none``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import torch

from bench_measure import forward_backward, interleaved_samples, machine_description, over_ranks
from bench_overlap import gemm_rate, link_speeds
from layer_impls import BuiltImpl
from moe_ep import MoEConfig, MoELayer
from moe_ep.eplb import plan_placement
from moe_ep.eplb.balancer import compare_plans, max_over_mean
from moe_ep.eplb.placement import Placement
from moe_ep.parallel.links import emulated_links
from moe_ep.parallel.spawn import run_on_ranks
from moe_ep.parallel.state import init_expert_parallel

LAYOUTS = {"ep2": dict(ranks=2, nodes=1), "2x2": dict(ranks=4, nodes=2), "4x8": dict(ranks=32, nodes=4)}
SYNTHETIC_LAYOUTS = ("ep2", "2x2", "4x8")
SYNTHETIC_SHAPES = {"ep2": (64, 6), "2x2": (64, 6), "4x8": (256, 8)}  # (experts, top-k) of the synthetic inputs
ROUTER_LAYOUTS = ("ep2", "2x2", "4x8")
REDUNDANT = (0.0, 0.125, 0.25)
POLICIES = ("none", "offline", "training")
TOKENS = 8192


# ------------------------------------------------------------------ inputs
def zipf_probs(E: int, s: float, gen: torch.Generator) -> torch.Tensor:
    """``p_e ~ rank^-s`` over a random order of the experts."""
    p = torch.arange(1, E + 1, dtype=torch.float64) ** -s
    return (p / p.sum())[torch.randperm(E, generator=gen)]


def drifting_probs(E: int, s: float, steps: int, every: int, gen: torch.Generator) -> torch.Tensor:
    """``[steps, E]``: zipf s whose hot experts drift. Every ``every`` steps the next order of the experts is
    the last one with a random expert among the 4 hottest traded with a random expert; in between, ``p``
    moves linearly from one order's probabilities to the next's."""
    p = zipf_probs(E, s, gen)
    orders = [p]
    for _ in range(steps // every + 1):
        nxt = orders[-1].clone()
        hot = int(nxt.argsort(descending=True)[torch.randint(0, 4, (1,), generator=gen)])
        other = int(torch.randint(0, E, (1,), generator=gen))
        nxt[hot], nxt[other] = orders[-1][other], orders[-1][hot]
        orders.append(nxt)
    alpha = torch.arange(steps, dtype=torch.float64) % every / every
    k = torch.arange(steps) // every
    return torch.stack(orders)[k] * (1 - alpha[:, None]) + torch.stack(orders)[k + 1] * alpha[:, None]


def sample_choices(probs_E: torch.Tensor, tokens: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """``[tokens, K]`` distinct experts per token drawn from ``probs_E`` (greedy routing of a skewed router)."""
    return torch.multinomial(probs_E.expand(tokens, -1), K, replacement=False, generator=gen)


def sample_loads(probs_SE: torch.Tensor, tokens: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """Routed pairs per expert of each step: ``tokens`` tokens routed by ``sample_choices`` from each row."""
    return torch.stack([torch.bincount(sample_choices(p, tokens, K, gen).flatten(), minlength=p.numel()).double()
                        for p in probs_SE])


# ------------------------------------------------------------------ planner measurements
def internode_rows(choices_TK: torch.Tensor, phy2log_P: torch.Tensor, ranks: int, nodes: int,
                   gen: torch.Generator) -> float:
    """Mean over tokens of the distinct nodes other than the token's own holding one of its experts."""
    P = phy2log_P.numel()
    node_E = torch.empty(int(phy2log_P.max()) + 1, dtype=torch.long)
    node_E[phy2log_P] = torch.arange(P) // (P // nodes)  # every slot of an expert sits on one node
    home_T = torch.randint(0, ranks, (choices_TK.shape[0],), generator=gen) // (ranks // nodes)
    hit_TN = torch.zeros(choices_TK.shape[0], nodes, dtype=torch.bool).scatter_(1, node_E[choices_TK], True)
    hit_TN[torch.arange(choices_TK.shape[0]), home_T] = False
    return hit_TN.sum(1).double().mean().item()


def run_policies(calib_E: torch.Tensor, loads_SE: torch.Tensor, choices_TK: torch.Tensor, layout: dict,
                 groups: int, redundant: float, interval: int, seed: int) -> dict:
    """Mean per-step max/mean under each placement policy (module docstring), and inter-node rows per token."""
    E = calib_E.numel()
    P = E + round(redundant * E / layout["ranks"]) * layout["ranks"]
    plan = lambda load: plan_placement(load, P, groups, layout["nodes"], layout["ranks"])  # noqa: E731
    offline = plan(calib_E)
    hindsight = plan(loads_SE.sum(0))  # a fixed plan knowable only after the fact
    current, window = offline, torch.zeros_like(calib_E)
    per_step = {policy: [] for policy in POLICIES}
    node_bound, oracle, after_fact, replans = [], [], [], 0
    for step, load_E in enumerate(loads_SE):
        if step % interval == 0:  # the plan of the step's own loads: what the planner does without prediction error
            oracle.append(max_over_mean(load_E, plan(load_E), layout["ranks"]))
        per_step["none"].append(max_over_mean(load_E, torch.arange(E), layout["ranks"]))
        per_step["offline"].append(max_over_mean(load_E, offline, layout["ranks"]))
        per_step["training"].append(max_over_mean(load_E, current, layout["ranks"]))
        after_fact.append(max_over_mean(load_E, hindsight, layout["ranks"]))
        node_bound.append(max_over_mean(load_E, current, layout["nodes"]))  # replicas stay in their node
        window += load_E
        if (step + 1) % interval == 0:
            candidate = plan(window)
            before, after = compare_plans(window, current, candidate, layout["ranks"])
            if after < before:
                current, replans = candidate, replans + 1
            window.zero_()
    gen = torch.Generator().manual_seed(seed)
    rows = {"none": internode_rows(choices_TK, torch.arange(E), layout["ranks"], layout["nodes"], gen)}
    gen = torch.Generator().manual_seed(seed)  # the same homes for every placement
    rows["offline"] = internode_rows(choices_TK, offline, layout["ranks"], layout["nodes"], gen)
    return dict(slots=P, redundant=(P - E) / E, replans=replans, node_max_mean_training=statistics.mean(node_bound),
                max_mean_oracle=statistics.mean(oracle), max_mean_hindsight=statistics.mean(after_fact),
                **{f"max_mean_{p}": statistics.mean(v) for p, v in per_step.items()},
                **{f"internode_rows_{p}": v for p, v in rows.items()})


def synthetic_input(name: str, E: int, K: int, args: argparse.Namespace, gen: torch.Generator) -> tuple:
    """(calibration loads [E], measured loads [S, E], choices [T, K]) of ``zipf s`` or ``drifting``."""
    if name == "drifting":
        drift = drifting_probs(E, 1.2, args.steps + args.interval, args.drift_every, gen)
        return (sample_loads(drift[:args.interval], TOKENS, K, gen).sum(0), sample_loads(drift[args.interval:],
                TOKENS, K, gen), sample_choices(drift[-1], 4096, K, gen))
    p = zipf_probs(E, float(name.split()[1]), gen)
    return (sample_loads(p[None], TOKENS, K, gen)[0], sample_loads(p.expand(args.steps, -1), TOKENS, K, gen),
            sample_choices(p, 4096, K, gen))


def planner_records(args: argparse.Namespace, router: dict | None) -> list[dict]:
    """Every (input, layout, redundant share) of the module docstring."""
    inputs = []  # (name, layout, calibration loads [L][E], measured loads [L][S, E], choices [L][T, K], groups)
    for i, name in enumerate(("zipf 0.8", "zipf 1.2", "zipf 1.6", "drifting")):
        for layout in SYNTHETIC_LAYOUTS:
            E, K = SYNTHETIC_SHAPES[layout]
            calib, measured, choices = synthetic_input(name, E, K, args, torch.Generator().manual_seed(i))
            inputs.append((name, layout, [calib], [measured], [choices], E))
    if router is not None:
        loads = [torch.tensor(layer, dtype=torch.float64) for layer in router["expert_load"]]
        for layout in ROUTER_LAYOUTS:
            inputs.append(("router", layout, [layer[0] for layer in loads], [layer[1:] for layer in loads],
                           [torch.tensor(c) for c in router["choices"]], router["source"]["moe"]["n_group"]))
    records = []
    for name, layout, calib, measured, choices, groups in inputs:
        for redundant in REDUNDANT:
            per_layer = [run_policies(c, m, ch, LAYOUTS[layout], groups, redundant,
                                      1 if name == "router" else args.interval, seed=i)
                         for i, (c, m, ch) in enumerate(zip(calib, measured, choices))]
            rec = {k: statistics.mean(r[k] for r in per_layer) for k in per_layer[0]}
            rec.update(input=name, layout=layout, experts=calib[0].numel(), top_k=choices[0].shape[1],
                       ranks=LAYOUTS[layout]["ranks"], nodes=LAYOUTS[layout]["nodes"], groups=groups,
                       max_mean_training_worst_layer=max(r["max_mean_training"] for r in per_layer))
            records.append(rec)
    return records


# ------------------------------------------------------------------ layer step time (processes)
def time_layout(rank: int, world: int, nodes: int, args: dict) -> dict:
    """The layer under each placement on this layout, zipf 1.2 routing imposed, under emulated links."""
    torch.set_num_threads(1)
    state = init_expert_parallel(ep_size=world, nodes=nodes)
    (E, K), H, I, T = SYNTHETIC_SHAPES["ep2"], args["hidden"], args["ffn"], args["tokens"]
    rate = gemm_rate(H, I, T * K * world // E)
    speeds = link_speeds(rate, T * K * 6 * H * I)
    probs = zipf_probs(E, 1.2, torch.Generator().manual_seed(0))
    calib = sample_loads(probs[None], T * world, K, torch.Generator().manual_seed(1))[0]  # the same on every rank
    idx_TK = sample_choices(probs, T, K, torch.Generator().manual_seed(100 + rank))
    base = MoEConfig(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K)
    torch.manual_seed(0)
    reference = MoELayer(base, state)
    full = reference.full_state_dict()
    layers = {"none": reference}
    for redundant in REDUNDANT:
        R = round(redundant * E / world) * world
        layer = MoELayer(base.replace(redundant_experts=R), state)
        layer.set_placement(Placement(plan_placement(calib, E + R, E, nodes, world), E, world, nodes))
        layer.load_full_state_dict(full)
        layers[f"eplb {redundant:.1%}"] = layer
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    grad = torch.randn(T, H, generator=torch.Generator().manual_seed(10 + rank))
    built, realized, errors = {}, {}, {}
    y_ref = None
    for name, layer in layers.items():
        layer.routing_replay = lambda n, idx=idx_TK: idx[:n]
        pairs = []
        hook = layer.experts.register_forward_pre_hook(lambda mod, inputs: pairs.append(int(inputs[2].sum())))
        with torch.no_grad():
            y = layer(x)
        hook.remove()
        y_ref = y if y_ref is None else y_ref
        errors[name] = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
        per_rank = torch.zeros(world, dtype=torch.float64)
        per_rank[rank] = sum(pairs)
        torch.distributed.all_reduce(per_rank)
        realized[name] = (per_rank.max() / per_rank.mean()).item()
        built[name] = BuiltImpl(layer, (x,), (grad,), lambda: None)

    def under_links(impl):
        def run():
            with emulated_links(**speeds):
                forward_backward(impl)
        return run

    samples = interleaved_samples({name: under_links(b) for name, b in built.items()}, args["iters"], args["warmup"],
                                  torch.device("cpu"))
    wall = over_ranks([statistics.median(w for w, _ in s) for s in samples.values()], "max")
    cpu = over_ranks([statistics.median(c for _, c in s) for s in samples.values()], "max")
    return dict(records=[dict(layout=f"{nodes}x{world // nodes}" if nodes > 1 else f"ep{world}", placement=name,
                              slots=layers[name].experts.num_local_experts * world, step_ms=w * 1e3, cpu_ms=c * 1e3,
                              realized_max_mean=realized[name], max_rel_err=errors[name], **speeds,
                              gemm_gflops=rate / 1e9)
                         for (name, w, c) in zip(built, wall, cpu)])


# ------------------------------------------------------------------ report
def print_planner(records: list[dict]) -> None:
    print("\nmax/mean per-rank load (mean over measured steps; router: over its 7 MoE layers) and inter-node rows "
          "per token (two-hop dispatcher)")
    print(f"{'input':<10}{'layout':<7}{'redundant':>10}{'slots':>6}{'none':>7}{'offline':>8}{'training':>9}"
          f"{'(node)':>7}{'oracle':>7}{'hindsight':>10}{'re-plans':>9}{'rows none':>10}{'rows EPLB':>10}")
    for r in records:
        print(f"{r['input']:<10}{r['layout']:<7}{r['redundant']:>10.1%}{r['slots']:>6}{r['max_mean_none']:>7.3f}"
              f"{r['max_mean_offline']:>8.3f}{r['max_mean_training']:>9.3f}{r['node_max_mean_training']:>7.3f}"
              f"{r['max_mean_oracle']:>7.3f}{r['max_mean_hindsight']:>10.3f}"
              f"{r['replans']:>9.1f}{r['internode_rows_none']:>10.3f}{r['internode_rows_offline']:>10.3f}")


def print_timing(records: list[dict]) -> None:
    first = records[0]
    print(f"\nlayer forward+backward, zipf 1.2 routing, EMULATED links (intra-node {first['intranode_GBps'] * 1e3:.1f} "
          f"MB/s, inter-node {first['internode_GBps'] * 1e3:.1f} MB/s, latency {first['latency_us'] / 1e3:.2f} ms)")
    print(f"{'layout':<7}{'placement':<14}{'slots':>6}{'step ms':>9}{'max CPU ms':>11}{'realized max/mean':>18}"
          f"{'max rel err':>12}")
    for r in records:
        print(f"{r['layout']:<7}{r['placement']:<14}{r['slots']:>6}{r['step_ms']:>9.1f}{r['cpu_ms']:>11.1f}"
              f"{r['realized_max_mean']:>18.3f}{r['max_rel_err']:>12.1e}")


def plot(records: list[dict], timing: list[dict], out_dir: pathlib.Path) -> list[pathlib.Path]:
    from matplotlib.figure import Figure

    from moe_ep.training.plots import save_figure

    paths = []
    inputs = list(dict.fromkeys(r["input"] for r in records))
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, layout in zip(axes, SYNTHETIC_LAYOUTS[::-1]):
        width = 0.8 / (1 + 2 * len(REDUNDANT))
        for i, name in enumerate(inputs):
            rows = [r for r in records if r["input"] == name and r["layout"] == layout]
            bars = [("none", rows[0]["max_mean_none"])] + \
                [(f"{kind} +{r['redundant']:.1%}", r[f"max_mean_{kind}"]) for kind in ("offline", "training")
                 for r in rows]
            for j, (label, value) in enumerate(bars):
                ax.bar(i + (j - len(bars) / 2) * width, value, width, color=_color(label),
                       label=label if i == 0 else None)
        ax.axhline(1.10, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(inputs)), inputs)
        ax.set_title(f"{layout} ({LAYOUTS[layout]['nodes']} node(s) x "
                     f"{LAYOUTS[layout]['ranks'] // LAYOUTS[layout]['nodes']} ranks)")
    axes[0].set_ylabel("max / mean per-rank load")
    axes[-1].legend(fontsize=7, ncol=2)
    fig.suptitle("EPLB: per-rank load balance (dashed: the 1.10 aim)")
    paths.append(save_figure(fig, out_dir / "bench_eplb_balance.png"))
    if timing:
        fig = Figure(figsize=(8, 4), layout="constrained")
        ax = fig.add_subplot()
        layouts = list(dict.fromkeys(r["layout"] for r in timing))
        names = list(dict.fromkeys(r["placement"] for r in timing))
        for j, name in enumerate(names):
            values = [next(r["step_ms"] for r in timing if r["layout"] == lay and r["placement"] == name)
                      for lay in layouts]
            ax.bar([i + (j - len(names) / 2) * 0.18 for i in range(len(layouts))], values, 0.18, label=name)
        ax.set_xticks(range(len(layouts)), layouts)
        ax.set_ylabel("forward+backward ms (median, slowest rank)")
        ax.set_title("One MoE layer, zipf 1.2 routing, EMULATED links")
        ax.legend()
        paths.append(save_figure(fig, out_dir / "bench_eplb_step.png"))
    return paths


def _color(label: str) -> str:
    if label == "none":
        return "tab:grey"
    shades = {"offline": ("#9ecae1", "#4292c6", "#08519c"), "training": ("#a1d99b", "#41ab5d", "#006d2c")}
    kind, share = label.split(" +")
    return shades[kind][[f"{r:.1%}" for r in REDUNDANT].index(share)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--router", default="docs/data/router_stats_v3mini256_eplb.json",
                   help="router_stats.py JSON with expert_load and choices (skipped when it has none)")
    p.add_argument("--steps", type=int, default=200, help="measured steps of the synthetic inputs")
    p.add_argument("--interval", type=int, default=10, help="steps between re-plans (--eplb-interval)")
    p.add_argument("--drift-every", type=int, default=20, help="steps over which a hot expert drifts to another")
    p.add_argument("--time", action=argparse.BooleanOptionalAction, default=True, help="also time the layer")
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank of the timed layer")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=2048, help="expert width (V3: 2048)")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="50 steps, 3 timing rounds")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="folder for bench_eplb_balance.png and bench_eplb_step.png")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.iters = 50, 3
    torch.set_num_threads(1)
    router_path = pathlib.Path(args.router)
    router = json.loads(router_path.read_text()) if router_path.is_file() else None
    if router is not None and "expert_load" not in router:
        print(f"{router_path}: no expert_load (written by an older router_stats.py): the router input is skipped")
        router = None
    records = planner_records(args, router)
    print_planner(records)
    timing = []
    if args.time:
        job = dict(hidden=args.hidden, ffn=args.ffn, tokens=args.tokens, iters=args.iters, warmup=args.warmup)
        for layout in ("ep2", "2x2"):
            ranks, nodes = LAYOUTS[layout]["ranks"], LAYOUTS[layout]["nodes"]
            timing += run_on_ranks(time_layout, ranks, nodes, job, timeout=1800)[0]["records"]
        print_timing(timing)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(machine=machine_description(torch.device("cpu")), args=vars(args),
                                        planner=records, timing=timing), indent=1))
        print(f"wrote {path}")
    if args.plot:
        for path in plot(records, timing, pathlib.Path(args.plot)):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()

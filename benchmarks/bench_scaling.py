"""Weak and strong scaling of the MoE layer over 1, 2 and 4 processes: moe_ep (flat and two-hop) and DeepSpeed.

For every process count P and mode (weak: ``--tokens`` per rank; strong:
``--tokens`` x max(P) tokens in all, split over the ranks) one process group
(``run_on_ranks``: gloo on CPU, one thread per rank; EP = P spanning 2
emulated nodes when P is even) builds every variant from the same weights:

* ``moe_ep``: greedy top-K, flat dispatcher (at P = 1 the single-process layer);
* ``moe_ep_2hop``: greedy top-K, two-hop dispatcher over the 2 emulated nodes;
* ``moe_ep_dev_M1``: device-limited routing (groups = ranks, M = 1), flat;
* ``moe_ep_node_M1``: node-limited routing (groups = the 2 nodes, M = 1), two-hop;
* ``deepspeed``: DeepSpeed's ``deepspeed.moe.layer.MoE`` (capacity-padded buffers).

It times forward+backward with iterations interleaved (``bench_measure``),
then profiles a few steps per variant for the share of the step spent in the
all-to-alls (``bench_measure.COMM_OPS``, issue and wait, forward and
backward), in the routed experts (moe_ep's ``moe_ep.experts`` ranges; hooks
label DeepSpeed's expert module the same way) and in the rest, and records
the rows each token sends: to every rank including its own, to other ranks,
across nodes, and the bytes to other ranks, against K and M.

    python benchmarks/bench_scaling.py --json docs/data/bench_scaling_cpu.json --plot docs/img
    python benchmarks/bench_scaling.py --quick          # < 3 min on 2 cores

The P processes share the machine's cores (2 here): beyond P = 2 the ranks
take turns on them. benchmarks/README.md lists every flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import pathlib
import statistics
from functools import partial

import torch

from bench_measure import forward_backward, interleaved_samples, machine_description, over_ranks, phase_shares
from layer_impls import CONFIGS, ReferenceWeights, build_deepspeed, build_moe_ep, rank_context, rank_input
from moe_ep.parallel.spawn import run_on_ranks

NODES = 2  # emulated nodes of every even process count
EXPERT_LABELS = ("moe_ep.experts", "deepspeed.experts")
IMPLS = ("moe_ep", "moe_ep_2hop", "moe_ep_dev_M1", "moe_ep_node_M1", "deepspeed")


def _variant_fields(P: int) -> dict[str, dict]:
    """MoEConfig fields of the moe_ep variants that apply at P processes."""
    variants = {"moe_ep": dict(dispatcher="flat")}
    if P > 1 and P % NODES == 0:
        variants.update({
            "moe_ep_2hop": dict(dispatcher="hierarchical"),
            "moe_ep_dev_M1": dict(dispatcher="flat", topk_method="device_limited", n_group=P, topk_group=1),
            "moe_ep_node_M1": dict(dispatcher="hierarchical", topk_method="node_limited", n_group=NODES,
                                   topk_group=1),
        })
    return variants


class _Labelled:
    """Forward and backward of ``module`` as ``torch.profiler`` ranges ``name`` and ``name.backward``."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.ranges = {}
        module.register_forward_pre_hook(lambda m, args: self._enter(name))
        module.register_forward_hook(lambda m, args, out: self._exit(name))
        module.register_full_backward_pre_hook(lambda m, grad_out: self._enter(name + ".backward"))
        module.register_full_backward_hook(lambda m, grad_in, grad_out: self._exit(name + ".backward"))

    def _enter(self, name: str) -> None:
        self.ranges[name] = torch.profiler.record_function(name)
        self.ranges[name].__enter__()

    def _exit(self, name: str) -> None:
        self.ranges.pop(name).__exit__(None, None, None)


def _traffic_per_token(impl: str, built, spec, P: int, ranks_per_node: int) -> dict:
    """Rows each token sends (all ranks incl. its own, other ranks, other nodes) and bytes to other ranks."""
    row_bytes = spec.hidden * 4  # fp32 rows
    if impl == "deepspeed":  # every rank sends E buffers of ceil(cf*T*K/E) rows, one per expert, P-1 of P elsewhere
        rows = spec.n_experts * math.ceil(spec.capacity_factor * spec.tokens * spec.top_k / spec.n_experts)
        per_token = rows / spec.tokens
        remote, internode = per_token * (P - 1) / P, per_token * (P - ranks_per_node) / P
    else:
        traffic = built.module.last_stats.traffic
        if not traffic:  # one process: nothing leaves the rank
            return dict(rows_per_token=float(spec.top_k), remote_rows_per_token=0.0, internode_rows_per_token=0.0,
                        remote_bytes_per_token=0.0)
        keys = ("rows_sent", "intranode_rows_sent", "internode_rows_sent")
        sent, intra, inter = over_ranks([float(traffic[k]) for k in keys], "mean")
        per_token, remote, internode = sent / spec.tokens, (intra + inter) / spec.tokens, inter / spec.tokens
    return dict(rows_per_token=per_token, remote_rows_per_token=remote, internode_rows_per_token=internode,
                remote_bytes_per_token=remote * row_bytes)


def _scaling_rank(rank: int, world: int, opts: dict, mode: str) -> dict:
    """Interleaved step times, phase shares and traffic of every variant at this process count."""
    spec = CONFIGS[opts["config"]].replace(**{k: opts[k] for k in ("hidden", "ffn") if opts[k] is not None})
    tokens = opts["tokens"] if mode == "weak" else opts["tokens"] * max(opts["procs"]) // world
    spec = spec.replace(tokens=tokens)
    nodes = NODES if world % NODES == 0 else 1
    ctx = rank_context(rank, world, torch.device("cpu"), torch.float32, nodes=nodes)
    weights, x_TH = ReferenceWeights.random(spec), rank_input(spec, rank)
    variants = _variant_fields(world)
    built = {name: build_moe_ep(spec, weights, ctx, x_TH, **fields)
             for name, fields in variants.items() if name in opts["impls"]}
    if "deepspeed" in opts["impls"]:
        built["deepspeed"] = build_deepspeed(spec, weights, ctx, x_TH)
        _Labelled(built["deepspeed"].module.routed.deepspeed_moe.experts, "deepspeed.experts")
    load = os.getloadavg()[0]
    samples = interleaved_samples({name: partial(forward_backward, b) for name, b in built.items()},
                                  opts["iters"], opts["warmup"], ctx.device)
    records = []
    for name, b in built.items():
        shares = phase_shares(partial(forward_backward, b), opts["profile_iters"], EXPERT_LABELS, ctx.device)
        shares = dict(zip(shares, over_ranks(list(shares.values()), "mean")))
        wall_s, cpu_s = zip(*samples[name])
        fields = variants.get(name, {})
        records.append(dict(
            impl=name, mode=mode, procs=world, nodes=nodes, tokens_per_rank=tokens, global_tokens=tokens * world,
            **dataclasses.asdict(spec), routing=fields.get("topk_method", "greedy"),
            M=fields.get("topk_group"), dispatcher=fields.get("dispatcher", "deepspeed" if name == "deepspeed"
                                                                   else "flat"),
            step_samples_ms=[s * 1e3 for s in wall_s],
            step_cpu_samples_ms=over_ranks([s * 1e3 for s in cpu_s], "max"),
            share_comm=shares["comm"], share_experts=shares["experts"], share_rest=shares["rest"],
            load_avg_1m=load, **_traffic_per_token(name, b, spec, world, world // nodes)))
    del built
    gc.collect()
    return {"records": records, "machine": machine_description(ctx.device)}


def run_scaling(opts: dict) -> tuple[list[dict], dict]:
    """(records, machine) of every (mode, process count)."""
    records, machine = [], None
    env = {"DS_ACCELERATOR": "cpu"}
    for mode in opts["modes"]:
        for P in opts["procs"]:
            out = run_on_ranks(_scaling_rank, P, opts, mode, timeout=opts["timeout"], env=env)[0]
            records += out["records"]
            machine = machine or out["machine"]
    for r in records:
        r["step_ms"] = statistics.median(r["step_samples_ms"])
        r["step_cpu_ms"] = statistics.median(r["step_cpu_samples_ms"])
        r["tokens_per_s"] = r["global_tokens"] / r["step_ms"] * 1e3
        for part in ("comm", "experts", "rest"):
            r[f"{part}_ms"] = r[f"share_{part}"] * r["step_ms"]
    return records, machine


def print_tables(records: list[dict], machine: dict) -> None:
    print(f"machine: {machine['cpu']} ({machine['cpu_cores']} cores); torch {machine['torch']}, deepspeed "
          f"{machine['deepspeed']}; gloo, {machine['threads_per_rank']} thread per rank. The P processes SHARE "
          f"these {machine['cpu_cores']} cores: at P = 4 two ranks take turns on each core.")
    r0 = records[0]
    print(f"layer: {r0['n_experts']} experts, top-{r0['top_k']}, hidden {r0['hidden']}, ffn {r0['ffn']}, fp32, "
          f"capacity factor {r0['capacity_factor']}; forward+backward; medians of {len(r0['step_samples_ms'])} "
          f"interleaved iterations; shares from torch.profiler (mean over ranks)")
    header = (f"{'impl':<16}{'P':>3}{'tok/rank':>9}{'step ms':>9}{'cpu ms':>8}{'tok/s':>8}{'comm':>7}{'experts':>8}"
              f"{'rest':>7}{'rows/tok':>9}{'K':>3}{'M':>3}{'remote':>8}{'inter':>7}{'remote B/tok':>13}{'load':>6}")
    for mode in dict.fromkeys(r["mode"] for r in records):
        print(f"\n{mode} scaling ({'tokens per rank fixed' if mode == 'weak' else 'global tokens fixed'})")
        print(header)
        for r in (r for r in records if r["mode"] == mode):
            print(f"{r['impl']:<16}{r['procs']:>3}{r['tokens_per_rank']:>9}{r['step_ms']:>9.1f}{r['step_cpu_ms']:>8.1f}"
                  f"{r['tokens_per_s']:>8.0f}{100 * r['share_comm']:>6.0f}%{100 * r['share_experts']:>7.0f}%"
                  f"{100 * r['share_rest']:>6.0f}%{r['rows_per_token']:>9.2f}{r['top_k']:>3}{r['M'] or '-':>3}"
                  f"{r['remote_rows_per_token']:>8.2f}{r['internode_rows_per_token']:>7.2f}"
                  f"{r['remote_bytes_per_token']:>13.0f}{r['load_avg_1m']:>6.1f}")
    print("\nrows/tok: rows a token sends to all ranks incl. its own (one per destination rank for moe_ep, K or "
          "fewer; DeepSpeed: its padded buffers, cf x K); remote: to other ranks; inter: to ranks of the other "
          "emulated node (DeepSpeed: the same layout, not node-aware); comm: all-to-all ops incl. waiting for "
          "slower ranks; load: 1-minute load average at the start")


def plot(records: list[dict], out_dir: str) -> list[pathlib.Path]:
    """``bench_scaling_{weak,strong}.png``: tokens/s and the comm share against P, one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for mode in dict.fromkeys(r["mode"] for r in records):
        fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(10, 4))
        rows = [r for r in records if r["mode"] == mode]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["procs"], r["tokens_per_s"], 100 * r["share_comm"]) for r in rows if r["impl"] == impl)
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax_c.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=impl)
        for ax, label in ((ax_t, "tokens/s (all ranks)"), (ax_c, "all-to-all share of the step (%)")):
            ax.set_xlabel("processes (sharing 2 CPU cores)")
            ax.set_ylabel(label)
            ax.set_xticks(sorted({r["procs"] for r in rows}))
            ax.grid(alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{mode} scaling, CPU (gloo), forward+backward")
        fig.tight_layout()
        path = pathlib.Path(out_dir) / f"bench_scaling_{mode}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2, 4], help="process counts (default 1 2 4)")
    p.add_argument("--modes", nargs="+", choices=("weak", "strong"), default=["weak", "strong"])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="default: all")
    p.add_argument("--config", choices=list(CONFIGS), default="e64k6", help="layer_impls configuration (e64k6)")
    p.add_argument("--tokens", type=int, default=None,
                   help="weak: tokens per rank; strong: tokens in all / max(--procs) (default 1024; --quick 256)")
    p.add_argument("--hidden", type=int, default=None, help="override the configuration's hidden size")
    p.add_argument("--ffn", type=int, default=None, help="override the configuration's expert width")
    p.add_argument("--iters", type=int, default=None, help="timed interleaved iterations (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--profile-iters", type=int, default=None, help="profiled steps per variant (default 2; --quick 1)")
    p.add_argument("--quick", action="store_true", help="256 tokens, 2 iterations: < 3 min on 2 cores")
    p.add_argument("--json", default=None, help="write the records and the machine here")
    p.add_argument("--plot", default=None, help="write bench_scaling_{weak,strong}.png into this folder")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a process group counts as hung")
    opts = vars(p.parse_args(argv))
    opts["procs"] = sorted(set(opts["procs"]))
    opts["tokens"] = opts["tokens"] or (256 if opts["quick"] else 1024)
    opts["iters"] = opts["iters"] or (2 if opts["quick"] else 5)
    opts["profile_iters"] = opts["profile_iters"] or (1 if opts["quick"] else 2)
    n_experts = CONFIGS[opts["config"]].n_experts
    for P in opts["procs"]:
        if P < 1 or n_experts % P:
            p.error(f"--procs {P}: must be positive and divide the {n_experts} experts of {opts['config']}")
        if "strong" in opts["modes"] and opts["tokens"] * max(opts["procs"]) % P:
            p.error(f"--procs {P}: strong scaling splits {opts['tokens'] * max(opts['procs'])} tokens evenly")
    if min(opts["tokens"], opts["iters"], opts["profile_iters"]) < 1 or opts["warmup"] < 0:
        p.error("--tokens, --iters and --profile-iters must be positive, --warmup >= 0")
    return opts


def main(argv=None) -> list[dict]:
    opts = parse_args(argv)
    records, machine = run_scaling(opts)
    print_tables(records, machine)
    if opts["json"]:
        path = pathlib.Path(opts["json"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"opts": opts, "machine": machine, "records": records}, indent=1))
        print(f"wrote {path}")
    if opts["plot"]:
        for path in plot(records, opts["plot"]):
            print(f"wrote {path}")
    return records


if __name__ == "__main__":
    main()

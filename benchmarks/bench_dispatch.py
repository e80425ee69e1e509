"""Expert-parallel dispatch benchmark: shared-expert overlap, row deduplication, two-hop dispatch.

Runs ``--ranks`` local processes (gloo on CPU, NCCL when CUDA is present).

* ``--nodes 1`` (default): for greedy and device-limited routing, the layer's
  forward and forward+backward time with the shared experts overlapped with
  the dispatch all-to-all and with them run after the combine, in the same
  run, and the rows moved per token against the K rows per token a
  per-(token, expert) dispatcher would send.
* ``--nodes N`` (N > 1, nodes emulated on one machine): the flat and the
  hierarchical (two-hop) dispatcher on the same weights and tokens, for greedy
  and node-limited routing with M = 1..N: inter-node and intra-node bytes per
  token (sent, summed over ranks, over all tokens), inter-node rows per token,
  and the hierarchical / flat time ratios.

    python benchmarks/bench_dispatch.py --ranks 2 --out dispatch.json
    python benchmarks/bench_dispatch.py --ranks 4 --nodes 2 --out dispatch_nodes.json

Ratios are what to read on a shared CPU machine; absolute times only mean
something on a GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

import moe_ep
from moe_ep import MoEConfig, MoELayer
from moe_ep.parallel.spawn import run_on_ranks

ROUTINGS = {
    "greedy": dict(),
    "device_limited_M1": dict(topk_method="device_limited", topk_group=1),
}
DISPATCHERS = ("flat", "hierarchical")


def _time(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _config(args: dict, n_group: int, **fields) -> MoEConfig:
    return MoEConfig(hidden_size=args["hidden"], moe_intermediate_size=args["inter"],
                     n_routed_experts=args["experts"], num_experts_per_tok=args["topk"],
                     n_shared_experts=args["shared"], n_group=n_group, **fields)


def _fwd_times(layer: MoELayer, x: torch.Tensor, iters: int) -> tuple[float, float]:
    """Median forward and forward+backward seconds."""
    def forward():
        with torch.no_grad():
            layer(x)

    def forward_backward():
        layer(x).square().mean().backward()

    return _time(forward, iters, 2), _time(forward_backward, iters, 1)


def _summed(stats: dict, keys: tuple[str, ...]) -> list[float]:
    """``stats[key]`` summed over the ranks, for each key."""
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return values.tolist()


def _bench_overlap(rank: int, world: int, args: dict) -> list[dict]:
    torch.manual_seed(rank)
    state = moe_ep.init_expert_parallel(ep_size=world)
    rows = []
    for name, routing in ROUTINGS.items():
        cfg = _config(args, world, **routing)
        layer = MoELayer(cfg, parallel=state)
        x = torch.randn(args["tokens"], cfg.hidden_size, requires_grad=True)
        result = {"routing": name, "tokens_per_rank": args["tokens"]}
        for overlap in (True, False):
            layer.dispatcher.overlap_shared = overlap
            tag = "overlap" if overlap else "serial"
            result[f"fwd_s_{tag}"], result[f"fwdbwd_s_{tag}"] = _fwd_times(layer, x, args["iters"])
        stats = layer.last_stats.as_dict()
        result["rows_per_token"] = _summed(stats, ("rows_sent",))[0] / (args["tokens"] * world)
        result["pairs_per_token"] = cfg.num_experts_per_tok
        result["dest_ranks_per_token_max"] = stats["dest_ranks_per_token_max"]
        rows.append(result)
    return rows


def _bench_nodes(rank: int, world: int, args: dict) -> list[dict]:
    nodes = args["nodes"]
    state = moe_ep.init_expert_parallel(ep_size=world, nodes=nodes)
    routings = {"greedy": dict()}
    routings.update({f"node_limited_M{m}": dict(topk_method="node_limited", topk_group=m)
                     for m in range(1, nodes + 1)})
    tokens = args["tokens"] * world
    rows = []
    for name, routing in routings.items():
        for dispatcher in DISPATCHERS:
            torch.manual_seed(0)  # same weights and tokens for both dispatchers
            layer = MoELayer(_config(args, nodes, dispatcher=dispatcher, **routing), parallel=state)
            torch.manual_seed(1 + rank)
            x = torch.randn(args["tokens"], args["hidden"], requires_grad=True)
            fwd, fwdbwd = _fwd_times(layer, x, args["iters"])
            inter_b, intra_b, inter_rows, rows_sent = _summed(layer.last_stats.as_dict(), (
                "internode_bytes_sent", "intranode_bytes_sent", "internode_rows_sent", "rows_sent"))
            rows.append({"routing": name, "dispatcher": dispatcher, "fwd_s": fwd, "fwdbwd_s": fwdbwd,
                         "internode_bytes_per_token": inter_b / tokens, "intranode_bytes_per_token": intra_b / tokens,
                         "internode_rows_per_token": inter_rows / tokens, "rows_per_token": rows_sent / tokens})
    return rows


def _print_overlap(rows: list[dict]) -> None:
    print(f"{'routing':<20}{'fwd overlap/serial':>20}{'fwd+bwd overlap/serial':>24}"
          f"{'rows/token':>12}{'K':>4}{'max dest':>10}")
    for r in rows:
        print(f"{r['routing']:<20}{r['fwd_s_overlap'] / r['fwd_s_serial']:>20.3f}"
              f"{r['fwdbwd_s_overlap'] / r['fwdbwd_s_serial']:>24.3f}"
              f"{r['rows_per_token']:>12.2f}{r['pairs_per_token']:>4}{r['dest_ranks_per_token_max']:>10}")


def _print_nodes(rows: list[dict]) -> None:
    print(f"{'routing':<18}{'dispatcher':<14}{'inter B/token':>14}{'intra B/token':>14}{'inter rows/token':>18}"
          f"{'rows/token':>12}{'fwd / flat':>12}{'fwd+bwd / flat':>16}")
    flat = {r["routing"]: r for r in rows if r["dispatcher"] == "flat"}
    for r in rows:
        base = flat[r["routing"]]
        print(f"{r['routing']:<18}{r['dispatcher']:<14}{r['internode_bytes_per_token']:>14.0f}"
              f"{r['intranode_bytes_per_token']:>14.0f}{r['internode_rows_per_token']:>18.3f}"
              f"{r['rows_per_token']:>12.3f}{r['fwd_s'] / base['fwd_s']:>12.3f}"
              f"{r['fwdbwd_s'] / base['fwdbwd_s']:>16.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1, help="emulated nodes; > 1 compares flat and two-hop")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256, help="routed expert width")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--shared", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = vars(parser.parse_args())
    if args["nodes"] < 1 or args["ranks"] % args["nodes"]:
        parser.error(f"--nodes {args['nodes']} must be positive and divide --ranks {args['ranks']}")
    bench = _bench_nodes if args["nodes"] > 1 else _bench_overlap
    rows = run_on_ranks(bench, args["ranks"], args, timeout=600)[0]
    print(f"ep={args['ranks']} nodes={args['nodes']} tokens/rank={args['tokens']} H={args['hidden']} "
          f"I={args['inter']} E={args['experts']} K={args['topk']} shared={args['shared']} (device: "
          f"{'cuda' if torch.cuda.is_available() else 'cpu, gloo'})")
    (_print_nodes if args["nodes"] > 1 else _print_overlap)(rows)
    if args["out"]:
        with open(args["out"], "w") as f:
            json.dump({"args": args, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""Expert-parallel dispatch benchmark: shared-expert overlap and row deduplication.

Runs ``--ranks`` local processes (gloo on CPU, NCCL when CUDA is present) and,
for greedy and device-limited routing, measures the layer's forward and
forward+backward time with the shared experts overlapped with the dispatch
all-to-all and with them run after the combine, all in the same run. Also
reports rows moved per token against the K rows per token a per-(token,
expert) dispatcher would send.

    python benchmarks/bench_dispatch.py --ranks 2 --out dispatch.json

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


def _bench_rank(rank: int, world: int, args: dict) -> list[dict]:
    torch.manual_seed(rank)
    state = moe_ep.init_expert_parallel(ep_size=world)
    rows = []
    for name, routing in ROUTINGS.items():
        cfg = MoEConfig(hidden_size=args["hidden"], moe_intermediate_size=args["inter"],
                        n_routed_experts=args["experts"], num_experts_per_tok=args["topk"],
                        n_shared_experts=args["shared"], n_group=world, **routing)
        layer = MoELayer(cfg, parallel=state)
        x = torch.randn(args["tokens"], cfg.hidden_size, requires_grad=True)

        def forward():
            with torch.no_grad():
                layer(x)

        def forward_backward():
            layer(x).square().mean().backward()

        result = {"routing": name, "tokens_per_rank": args["tokens"]}
        for overlap in (True, False):
            layer.dispatcher.overlap = overlap
            tag = "overlap" if overlap else "serial"
            result[f"fwd_s_{tag}"] = _time(forward, args["iters"], 2)
            result[f"fwdbwd_s_{tag}"] = _time(forward_backward, args["iters"], 1)
        stats = layer.last_stats.as_dict()
        sent = torch.tensor([stats["rows_sent"]], dtype=torch.float64)
        dist.all_reduce(sent)
        result["rows_per_token"] = sent.item() / (args["tokens"] * world)
        result["pairs_per_token"] = cfg.num_experts_per_tok
        result["dest_ranks_per_token_max"] = stats["dest_ranks_per_token_max"]
        rows.append(result)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256, help="routed expert width")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--shared", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = vars(parser.parse_args())
    rows = run_on_ranks(_bench_rank, args["ranks"], args, timeout=600)[0]
    header = (f"{'routing':<20}{'fwd overlap/serial':>20}{'fwd+bwd overlap/serial':>24}"
              f"{'rows/token':>12}{'K':>4}{'max dest':>10}")
    print(f"ep={args['ranks']} tokens/rank={args['tokens']} H={args['hidden']} I={args['inter']} "
          f"E={args['experts']} K={args['topk']} shared={args['shared']} (device: "
          f"{'cuda' if torch.cuda.is_available() else 'cpu, gloo'})")
    print(header)
    for r in rows:
        print(f"{r['routing']:<20}{r['fwd_s_overlap'] / r['fwd_s_serial']:>20.3f}"
              f"{r['fwdbwd_s_overlap'] / r['fwdbwd_s_serial']:>24.3f}"
              f"{r['rows_per_token']:>12.2f}{r['pairs_per_token']:>4}{r['dest_ranks_per_token_max']:>10}")
    if args["out"]:
        with open(args["out"], "w") as f:
            json.dump({"args": args, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()

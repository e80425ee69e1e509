"""Routing statistics of a trained router of ours at the expert-parallel layouts a projection needs.

Loads a training run of ``launch/train.py`` (its ``run.json`` and latest
checkpoint), runs the model over validation tokens of its corpus, keeps every
MoE layer's router logits, and re-selects the experts with the layer's own
scores and bias under each routing rule at each layout: E experts over G GPUs
(E/G per GPU, ``--gpus-per-node`` per node, N nodes), each token's home GPU
drawn uniformly. Per (G, routing), averaged over the MoE layers:

    remote_ranks     = mean over tokens of |{ranks holding a chosen expert} - {home}|
    internode_ranks  = the part of them on other nodes (rows the flat dispatcher sends across nodes)
    remote_nodes     = mean |{nodes holding a chosen expert} - {home node}|   (the two-hop dispatcher's inter-node rows)
    hop2_rows        = mean sum over destination nodes m of |{ranks of m hit} - {the forwarding rank (m, l_home)}|
    imbalance        = max over ranks of (pairs received) / mean                 (and its maximum over layers)

Routing rules: ``greedy`` (top-K), ``device_limited`` (groups = GPUs, M =
max(--device-limit, ceil(K G / E)) so K experts stay reachable) and
``node_limited`` (groups = nodes, M = min(--node-limit, N); DeepSeek-V3: 4).

With ``--json`` it also writes, under the layer's own routing (its config
and bias), what ``benchmarks/bench_eplb.py`` plans expert placements from:
``expert_load`` (per layer, routed pairs per expert in each of
``--load-chunks`` consecutive chunks of the tokens) and ``choices`` (per
layer, the experts of the first ``--choice-tokens`` tokens).

    python benchmarks/router_stats.py runs/router256 --json docs/data/router_stats_v3mini256.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib

import torch

from moe_ep import MoELayer, ParallelState
from moe_ep.checkpoint.save_load import load_weights
from moe_ep.data import load_corpus
from moe_ep.models import ModelConfig, MoETransformerLM
from moe_ep.router import select_experts
from moe_ep.checkpoint import latest_checkpoint

GPU_COUNTS = (8, 16, 32, 64, 128, 256)


@torch.no_grad()
def router_logits(run_dir: pathlib.Path, n_tokens: int, seq_len: int) -> tuple[list[tuple], dict]:
    """[(MoEConfig, bias_E or None, logits_TE)] of every MoE layer over ``n_tokens`` validation tokens; run info."""
    info = json.loads((run_dir / "run.json").read_text())
    model = MoETransformerLM(ModelConfig.from_dict(info["model"]), ParallelState(), seed=0).eval()
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise SystemExit(f"router_stats: no complete checkpoint under {run_dir / 'ckpt'}")
    load_weights(ckpt, model, ParallelState())
    source = info["data"]["source"]
    corpus = load_corpus(None)  # the default corpus (the Python stdlib sources), else the recorded --data
    if corpus.fingerprint != info["data"]["fingerprint"]:
        corpus = load_corpus(source)
    if corpus.fingerprint != info["data"]["fingerprint"]:
        raise SystemExit(f"router_stats: the corpus {source!r} differs from the one {run_dir} was trained on")
    n_seq = min(n_tokens // seq_len, corpus.val.numel() // seq_len)
    tokens_BS = corpus.val[: n_seq * seq_len].long().view(n_seq, seq_len)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    captured = {id(layer.router): [] for layer in layers}
    hooks = [layer.router.register_forward_hook(lambda mod, args, out: captured[id(mod)].append(out.logits_TE))
             for layer in layers]
    for batch in tokens_BS.split(16):
        model(batch)
    for h in hooks:
        h.remove()
    out = [(layer.config, layer.router.e_score_correction_bias, torch.cat(captured[id(layer.router)]))
           for layer in layers]
    return out, dict(run=str(run_dir), checkpoint=str(ckpt), tokens=n_seq * seq_len, moe=info["model"]["moe"])


def routing_rules(E: int, K: int, G: int, gpus_per_node: int, device_limit: int, node_limit: int) -> dict:
    """MoEConfig fields of each routing rule at G GPUs."""
    N = max(G // gpus_per_node, 1)
    return {"greedy": dict(topk_method="greedy", n_group=1, topk_group=1),
            "device_limited": dict(topk_method="device_limited", n_group=G,
                                   topk_group=min(G, max(device_limit, math.ceil(K * G / E)))),
            "node_limited": dict(topk_method="node_limited", n_group=N, topk_group=min(node_limit, N))}


def layout_stats(idx_TK: torch.Tensor, E: int, G: int, gpus_per_node: int, seed: int = 0) -> dict:
    """The module docstring's statistics of one layer's choices ``idx_TK`` at G GPUs."""
    T = idx_TK.shape[0]
    L = min(gpus_per_node, G)
    N = G // L
    home_T = torch.randperm(T, generator=torch.Generator().manual_seed(seed)) % G
    hit_TG = torch.zeros(T, G, dtype=torch.bool).scatter_(1, idx_TK // (E // G), True)
    rows = torch.arange(T)
    remote_T = hit_TG.sum(1) - hit_TG[rows, home_T].long()
    hit_TNL = hit_TG.view(T, N, L)
    home_node_T, local_T = home_T // L, home_T % L
    other_node_TN = torch.ones(T, N, dtype=torch.bool).scatter_(1, home_node_T[:, None], False)
    internode_T = (hit_TNL.sum(2) * other_node_TN).sum(1)
    node_hit_TN = hit_TNL.any(2)
    remote_nodes_T = (node_hit_TN & other_node_TN).sum(1)
    forwarder_hit_TN = hit_TNL[rows, :, local_T]  # [T, N]: the rank with the home's local index on node m is hit
    hop2_T = hit_TNL.sum(2).sum(1) - forwarder_hit_TN.sum(1)
    load_G = torch.bincount((idx_TK // (E // G)).flatten(), minlength=G).double()
    return dict(remote_ranks=remote_T.double().mean().item(), internode_ranks=internode_T.double().mean().item(),
                remote_nodes=remote_nodes_T.double().mean().item(), hop2_rows=hop2_T.double().mean().item(),
                imbalance=(load_G.max() / load_G.mean()).item())


def measure(layers: list[tuple], gpu_counts, gpus_per_node: int, device_limit: int, node_limit: int) -> list[dict]:
    """One record per (G, routing): the statistics averaged over layers, imbalance also as its max."""
    records = []
    for G in gpu_counts:
        cfg0 = layers[0][0]
        E, K = cfg0.n_routed_experts, cfg0.num_experts_per_tok
        if E % G:
            raise ValueError(f"router_stats: {E} experts do not divide over {G} GPUs")
        for name, fields in routing_rules(E, K, G, gpus_per_node, device_limit, node_limit).items():
            per_layer = [layout_stats(select_experts(logits, dataclasses.replace(cfg, **fields), bias).topk_idx_TK,
                                      E, G, gpus_per_node, seed=i)
                         for i, (cfg, bias, logits) in enumerate(layers)]
            rec = {k: sum(s[k] for s in per_layer) / len(per_layer) for k in per_layer[0]}
            rec.update(gpus=G, nodes=max(G // gpus_per_node, 1), routing=name, M=fields["topk_group"]
                       if name != "greedy" else None, imbalance_max=max(s["imbalance"] for s in per_layer),
                       experts=E, top_k=K)
            records.append(rec)
    return records


def own_routing(layers: list[tuple], chunks: int, choice_tokens: int) -> dict:
    """``expert_load`` [layer][chunk][E] and ``choices`` [layer][token][K] under each layer's own routing."""
    loads, choices = [], []
    for cfg, bias, logits in layers:
        idx_TK = select_experts(logits, cfg, bias).topk_idx_TK
        loads.append([torch.bincount(part.flatten(), minlength=cfg.n_routed_experts).tolist()
                      for part in idx_TK.chunk(chunks)])
        choices.append(idx_TK[:choice_tokens].tolist())
    return dict(expert_load=loads, choices=choices)


def print_table(records: list[dict], source: dict) -> None:
    print(f"router: {source['run']} ({source['checkpoint']}), {source['tokens']} validation tokens, "
          f"{len(records) and records[0]['experts']} experts, top-{records[0]['top_k']}; means over MoE layers")
    print(f"{'GPUs':>5}{'nodes':>6}  {'routing':<16}{'M':>3}{'remote ranks':>13}{'inter ranks':>12}"
          f"{'remote nodes':>13}{'hop-2 rows':>11}{'imbalance':>10}{'(max)':>7}")
    for r in records:
        print(f"{r['gpus']:>5}{r['nodes']:>6}  {r['routing']:<16}{r['M'] or '-':>3}{r['remote_ranks']:>13.2f}"
              f"{r['internode_ranks']:>12.2f}{r['remote_nodes']:>13.2f}{r['hop2_rows']:>11.2f}"
              f"{r['imbalance']:>10.2f}{r['imbalance_max']:>7.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a launch/train.py output folder (run.json and ckpt/)")
    p.add_argument("--tokens", type=int, default=65536, help="validation tokens to route (default 65536)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--gpus", nargs="+", type=int, default=list(GPU_COUNTS), help="GPU counts (default 8..256)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--device-limit", type=int, default=4, help="device-limited M (raised to ceil(K G / E))")
    p.add_argument("--node-limit", type=int, default=4, help="node-limited M (DeepSeek-V3: 4)")
    p.add_argument("--json", default=None, help="write {source, records, expert_load, choices} here")
    p.add_argument("--load-chunks", type=int, default=8, help="token chunks of expert_load (default 8)")
    p.add_argument("--choice-tokens", type=int, default=512, help="tokens of choices (default 512)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    layers, source = router_logits(pathlib.Path(args.run_dir), args.tokens, args.seq_len)
    records = measure(layers, args.gpus, args.gpus_per_node, args.device_limit, args.node_limit)
    print_table(records, source)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        own = own_routing(layers, args.load_chunks, args.choice_tokens)
        path.write_text(json.dumps({"source": source, "records": records, **own}, separators=(",", ":")) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

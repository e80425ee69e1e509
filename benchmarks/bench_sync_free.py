"""The sync-free layer (``MoEConfig.sync_free``) eager, compiled whole and, on a GPU, captured in a CUDA graph.

For every routing mode with a capacity (``MODES``): one eager ``MoELayer`` and one ``torch.compile(layer,
fullgraph=True)`` from the same weights run the same training steps (forward, backward of ``sum(y * g) +
aux_loss``, ``update_bias``); the outputs, aux loss and every gradient of the compiled layer are compared with
the eager one's (``max |compiled - eager| / (1 + max |eager|)``) and ``processed + dropped == routed`` is checked.
Then both are timed, steps interleaved (medians of wall and CPU time); with ``--cuda-graph`` (CUDA only) the
eager layer's forward+backward is also captured in one CUDA graph and its replay timed. The EP size is the
world size: one process for ep 1, ``torchrun`` for more.

    .venv/bin/python benchmarks/bench_sync_free.py --json runs/sync_free_ep1.json
    .venv/bin/torchrun --standalone --nproc_per_node 2 benchmarks/bench_sync_free.py --json runs/sync_free_ep2.json
    python benchmarks/bench_sync_free.py --device cuda --cuda-graph          # benchmarks/gpu_check.sh
    .venv/bin/python benchmarks/bench_sync_free.py --tiny --backend aot_eager --iters 0   # correctness only

Exits with status 1 when a compiled result differs from eager by more than ``--tol``, a mode's layer was not
captured as one graph (a graph break or a recompilation) or a pair is lost.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.distributed as dist

import moe_ep
from moe_ep import MoEConfig, MoELayer

LOSSES = dict(expert_balance_coef=0.01, device_balance_coef=0.01, comm_balance_coef=0.01, z_loss_coef=1e-3)
MODES = {  # every routing mode with a capacity; n_group = 4 groups of experts
    "expert_position": dict(drop_policy="position", **LOSSES),
    "expert_affinity": dict(drop_policy="affinity", **LOSSES),
    "v2_device_limited_dropping": dict(topk_method="device_limited", n_group=4, topk_group=2,
                                       device_capacity_factor=1.0, protected_seq_frac=0.25,
                                       routed_scaling_factor=16.0, n_shared_experts=2, **LOSSES),
    "v3_node_limited_bias": dict(scoring_func="sigmoid", topk_method="node_limited", n_group=4, topk_group=2,
                                 norm_topk_prob=True, aux_free_bias=True, seq_balance_coef=1e-3,
                                 n_shared_experts=1),
}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return 0.0 if want.numel() == 0 else ((got - want).abs().max() / (1 + want.abs().max())).item()


def _config(opts: dict, mode: str) -> MoEConfig:
    return MoEConfig(hidden_size=opts["hidden"], moe_intermediate_size=opts["ffn"], n_routed_experts=opts["experts"],
                     num_experts_per_tok=opts["topk"], activation=opts["activation"], expert_capacity_factor=1.0,
                     sync_free=True, **MODES[mode])


def _step(module, layer: MoELayer, x: torch.Tensor, g: torch.Tensor, world: int) -> tuple[torch.Tensor, ...]:
    """One training step: forward, backward of ``sum(y * g) + aux_loss / W``, bias update; results detached."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    (y * g).sum().add(layer.aux_loss / world).backward()
    out = (y.detach(), layer.aux_loss.detach(), x.grad) + tuple(p.grad.detach().clone() for p in layer.parameters())
    layer.update_bias()
    layer.zero_grad(set_to_none=True)
    return out


def _inputs(opts: dict, step: int, rank: int, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    shape = (opts["tokens"] // opts["seq_len"], opts["seq_len"], opts["hidden"])
    return torch.randn(shape, generator=gen).to(device, dtype), torch.randn(shape, generator=gen).to(device, dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _timed(fn, device: torch.device) -> tuple[float, float]:
    _synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    cpu = time.process_time() - cpu
    _synchronize(device)
    return (time.perf_counter() - wall) * 1e3, cpu * 1e3


def _cuda_graph_ms(layer: MoELayer, x: torch.Tensor, g: torch.Tensor, iters: int) -> float:
    """Median replay time of the eager layer's forward+backward captured in one CUDA graph."""
    static_x = x.detach().clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy state)
        for _ in range(3):
            (layer(static_x) * g).sum().add(layer.aux_loss).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (layer(static_x) * g).sum().add(layer.aux_loss).backward()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_mode(opts: dict, mode: str, parallel, rank: int, world: int, device: torch.device) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[opts["dtype"]]
    cfg = _config(opts, mode)
    torch.manual_seed(0)
    reference = MoELayer(cfg)  # the full weights, the same on every rank
    eager, compiled_layer = (MoELayer(cfg, parallel=parallel).to(device, dtype) for _ in range(2))
    for layer in (eager, compiled_layer):
        layer.load_full_state_dict(reference.state_dict())
    compiled = torch.compile(compiled_layer, fullgraph=True, backend=opts["backend"])
    from torch._dynamo.utils import counters  # imported by torch.compile's first call anyway
    graphs_before = counters["stats"]["unique_graphs"]
    errors, compile_s = {}, None
    for step in range(opts["check_steps"]):
        x, g = _inputs(opts, step, rank, device, dtype)
        want = _step(eager, eager, x, g, world)
        start = time.perf_counter()
        got = _step(compiled, compiled_layer, x, g, world)
        compile_s = compile_s if compile_s is not None else time.perf_counter() - start
        names = ["output", "aux_loss", "input_grad"] + [f"grad:{n}" for n, _ in eager.named_parameters()]
        for name, a, b in zip(names, got, want):
            errors[name] = max(errors.get(name, 0.0), _rel_err(a.float(), b.float()))
        stats = compiled_layer.last_stats.as_dict()
        assert stats["processed_pairs"] + stats["dropped_pairs"] == stats["routed_pairs"], (mode, stats)
        assert stats == eager.last_stats.as_dict(), (mode, stats, eager.last_stats.as_dict())
    record = dict(mode=mode, ep=world, device=device.type, dtype=opts["dtype"], backend=opts["backend"],
                  tokens=opts["tokens"], hidden=opts["hidden"], ffn=opts["ffn"], experts=opts["experts"],
                  topk=opts["topk"], compile_s=compile_s, max_err=max(errors.values()), errors=errors,
                  dropped_frac=stats["dropped_pairs"] / stats["routed_pairs"])
    if opts["iters"]:
        x, g = _inputs(opts, 0, rank, device, dtype)
        samples = {"eager": [], "compiled": []}
        for _ in range(opts["iters"]):
            samples["eager"].append(_timed(lambda: _step(eager, eager, x, g, world), device))
            samples["compiled"].append(_timed(lambda: _step(compiled, compiled_layer, x, g, world), device))
        for name, values in samples.items():
            record[f"{name}_ms"] = statistics.median(w for w, _ in values)
            record[f"{name}_cpu_ms"] = statistics.median(c for _, c in values)
        if opts["cuda_graph"]:
            record["cuda_graph_ms"] = _cuda_graph_ms(eager, x, g, opts["iters"])
    record["graphs"] = counters["stats"]["unique_graphs"] - graphs_before  # 1: one graph, never recompiled
    return record


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor; aot_eager: "
                                                          "dynamo and AOT autograd without code generation)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank (default 1024)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=256, help="expert width (default 256)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--activation", choices=("gelu", "swiglu"), default="gelu")
    p.add_argument("--tiny", action="store_true", help="hidden 16, ffn 8, 8 experts, top-2, 32 tokens: "
                                                       "correctness at test speed")
    p.add_argument("--check-steps", type=int, default=3, help="compared training steps (default 3)")
    p.add_argument("--iters", type=int, default=7, help="timed steps of each (default 7; 0: no timing)")
    p.add_argument("--cuda-graph", action="store_true", help="also capture the eager step in a CUDA graph")
    p.add_argument("--tol", type=float, default=1e-5, help="largest relative difference allowed (default 1e-5)")
    p.add_argument("--json", default=None, help="write the records (a JSON list) here (rank 0)")
    opts = vars(p.parse_args(argv))
    if opts["tiny"]:
        opts.update(hidden=16, ffn=8, experts=8, topk=2, tokens=32, seq_len=8)
    if opts["cuda_graph"] and opts["device"] != "cuda":
        p.error("--cuda-graph needs --device cuda")
    if opts["device"] == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible")
    if opts["tokens"] % opts["seq_len"]:
        p.error("--tokens must be a multiple of --seq-len")
    if opts["check_steps"] < 1 or opts["iters"] < 0:
        p.error("--check-steps must be >= 1 and --iters >= 0")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts["device"] == "cpu":
        torch.set_num_threads(1)  # as bench_layer.py: one thread per rank
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if opts["device"] == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel = moe_ep.init_expert_parallel(ep_size=world) if world > 1 else None
    records = [run_mode(opts, mode, parallel, rank, world, device) for mode in opts["modes"]]
    bad = [(r["mode"], r["max_err"], r["graphs"]) for r in records if not (r["max_err"] <= opts["tol"] and
                                                                           r["graphs"] == 1)]
    if rank == 0:
        print(f"sync-free layer, ep {world}, {device.type}, {opts['dtype']}, backend {opts['backend']}: "
              f"{opts['tokens']} tokens/rank, hidden {opts['hidden']}, {opts['experts']} experts top-{opts['topk']}, "
              f"ffn {opts['ffn']}; torch {torch.__version__}")
        print(f"{'mode':<28}{'compile s':>10}{'max err':>10}{'eager ms':>10}{'compiled ms':>12}"
              f"{'eager cpu':>10}{'comp. cpu':>10}{'graph ms':>9}{'dropped':>8}")
        for r in records:
            cells = [f"{r.get(k, float('nan')):.1f}" for k in ("eager_ms", "compiled_ms", "eager_cpu_ms",
                                                                "compiled_cpu_ms", "cuda_graph_ms")]
            print(f"{r['mode']:<28}{r['compile_s']:>10.1f}{r['max_err']:>10.1e}{cells[0]:>10}{cells[1]:>12}"
                  f"{cells[2]:>10}{cells[3]:>10}{cells[4]:>9}{100 * r['dropped_frac']:>7.1f}%")
        if opts["json"]:
            path = pathlib.Path(opts["json"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records, indent=1))
        if bad:
            print(f"compiled differs from eager by more than {opts['tol']} or is not one graph "
                  f"(mode, error, graphs): {bad}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

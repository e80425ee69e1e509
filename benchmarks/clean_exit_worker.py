"""One rank of ``bench_clean_exit.py``'s short torchrun job; writes ``OUT/rank<r>.json``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/clean_exit_worker.py --job layer --out DIR

Jobs (gloo, one thread per rank, three forward+backward steps, then ``destroy_process_group``):

* ``layer``: two expert-parallel ``MoELayer`` s (ep = world size, 64 experts, top-6) on 1024 tokens per rank;
* ``functional``: the bare all-to-all of rows through torch's autograd-aware functional collective
  (``all_to_all_single_autograd``, which imports ``torch._dynamo`` on first use);
* ``c10d``: the same exchange through ``dist.all_to_all_single``.

Reported per rank: RSS after setup, after the first step and at the end (MiB), the first step's time and the
median of the later ones (ms), the modules imported by the first step, and whether ``torch._dynamo`` is loaded.
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


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def layer_step(world: int):
    import moe_ep

    state = moe_ep.init_expert_parallel(ep_size=world)
    cfg = moe_ep.MoEConfig(hidden_size=128, moe_intermediate_size=64, n_routed_experts=64, num_experts_per_tok=6)
    layers = torch.nn.Sequential(moe_ep.MoELayer(cfg, state, name="a"), moe_ep.MoELayer(cfg, state, name="b"))
    x = torch.randn(4, 256, cfg.hidden_size, requires_grad=True)

    def step():
        layers(x).square().mean().backward()
    return step


def exchange_step(world: int, functional: bool):
    dist.init_process_group("gloo")
    rows, width = 1024, 128
    split = [rows // world] * world
    x = torch.randn(rows, width, requires_grad=True)

    def step():
        if functional:
            from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
            y = wait_tensor(all_to_all_single_autograd(x * 2, split, split, dist.group.WORLD))
        else:
            y = torch.empty_like(x)
            dist.all_to_all_single(y, (x * 2).detach(), split, split)
            y.requires_grad_()
        y.sum().backward()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=("layer", "functional", "c10d"), required=True)
    p.add_argument("--out", type=pathlib.Path, required=True, help="folder for the per-rank JSON files")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    world = int(os.environ["WORLD_SIZE"])
    step = layer_step(world) if args.job == "layer" else exchange_step(world, args.job == "functional")
    rss_setup, modules_before = rss_mib(), set(sys.modules)
    times = []
    for i in range(3):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
        if i == 0:
            rss_first, new_modules = rss_mib(), len(set(sys.modules) - modules_before)
    record = dict(job=args.job, rank=dist.get_rank(), rss_setup_mib=round(rss_setup, 1),
                          rss_after_first_step_mib=round(rss_first, 1), rss_end_mib=round(rss_mib(), 1),
                          first_step_ms=round(times[0], 2), later_step_ms=round(statistics.median(times[1:]), 2),
                          modules_imported_by_first_step=new_modules,
                          dynamo_loaded="torch._dynamo" in sys.modules)
    (args.out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

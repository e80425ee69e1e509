"""Memory of one training step with and without activation checkpointing (and recompute_experts, and bf16).

    python benchmarks/bench_activation_memory.py --out docs/data/activation_memory.json

One process, CPU. For each case the model is built, one untimed step runs
(so lazily made buffers exist), then one forward + backward runs under
``torch.profiler`` with ``profile_memory=True``, which records every
allocation and free of the CPU allocator. From that trace:

    kept   bytes allocated during the forward and still alive when it ends:
           what is held for backward (activations, the loss graph)
    peak   the highest sum of live bytes allocated since the step began, at
           any point of forward or backward (activations, gradients,
           temporaries, the recomputed block); the parameters' gradients
           (``grads``, in fp32) are part of it

Parameters and the batch exist before the step and are not counted. The
cases: no checkpointing, ``MoEConfig.recompute_experts`` (the routed
experts keep no pre-activations), ``--activation-checkpointing`` (every
block keeps only its input), both; each in fp32 and in bf16 autocast. Also
printed: the median seconds of 3 unprofiled steps before (one thread).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from moe_ep.models import ModelConfig, MoETransformerLM
from moe_ep.model_moe import total_aux_loss
from moe_ep.training.step import next_token_loss, precision_autocast

CASES = {"none": (False, False), "recompute_experts": (True, False), "activation_checkpointing": (False, True),
         "both": (True, True)}


def _step(model: MoETransformerLM, batch: torch.Tensor, precision: str) -> None:
    model.zero_grad(set_to_none=True)
    with record_function("forward"):
        with precision_autocast(precision, batch.device):
            loss = next_token_loss(model, batch) + total_aux_loss(model)
    loss.backward()


def measure(preset: str, batch: torch.Tensor, precision: str, recompute_experts: bool, checkpointing: bool) -> dict:
    """kept and peak MiB (module docstring), the parameters' gradients (in peak) and the median seconds of 3 steps."""
    base = ModelConfig.preset(preset)
    model = MoETransformerLM(base.replace(moe=base.moe.replace(recompute_experts=recompute_experts))).train()
    model.activation_checkpointing = checkpointing
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        _step(model, batch, precision)
        seconds.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, batch, precision)
    events = prof.profiler.kineto_results.events()
    forward_end = max(e.end_ns() for e in events if e.name() == "forward")
    live = peak = kept = 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if event.start_ns() > forward_end and not kept:
            kept = live
        live += event.nbytes()
        peak = max(peak, live)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(kept_mib=kept / 2 ** 20, peak_mib=peak / 2 ** 20, grads_mib=grads / 2 ** 20,
                seconds=sorted(seconds)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="v2-lite-mini")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    batch = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    results = {}
    for precision in ("fp32", "bf16"):
        for case, (recompute_experts, checkpointing) in CASES.items():
            r = measure(args.preset, batch, precision, recompute_experts, checkpointing)
            results[f"{precision}/{case}"] = r
            none = results[f"{precision}/none"]
            print(f"{precision:4s} {case:25s} kept {r['kept_mib']:7.1f} MiB  peak {r['peak_mib']:7.1f} MiB "
                  f"({r['peak_mib'] / none['peak_mib']:.2f}x, gradients {r['grads_mib']:.1f})  "
                  f"step {r['seconds']:.2f} s ({r['seconds'] / none['seconds']:.2f}x)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len,
                                            threads=1, torch=torch.__version__, results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()

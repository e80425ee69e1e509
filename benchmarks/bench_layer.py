"""Side-by-side MoE layer benchmark: moe_ep, DeepSpeed's MoE, the textbook MoE and the dense bound.

For every configuration (``layer_impls.CONFIGS``), expert-parallel size and
dtype, one process group (``run_on_ranks``: gloo on CPU, NCCL on CUDA, one
thread per rank) builds every implementation from the same weights and times
them with iterations interleaved (A, B, C, D, A, B, ...): the inference
forward (no autograd graph) and forward+backward, medians after warm-up.
Peak memory of forward+backward is then measured for each implementation in
a process group of its own (one group of the largest EP size per
implementation measures every EP size; at ep 1 each rank runs a
single-process layer of its own). Ratios are to the dense bound of the same
run.

    python benchmarks/bench_layer.py --json docs/data/bench_layer_cpu.json --plot docs/img
    python benchmarks/bench_layer.py --quick                 # < 3 min on 2 idle cores
    python benchmarks/bench_layer.py --profile --ep 1 2      # torch.profiler over moe_ep (or --impls), top ops
    python benchmarks/bench_layer.py --device cuda --ep 1    # on a GPU

benchmarks/README.md lists every flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import statistics
import sys
from functools import partial

import torch

from bench_measure import (forward_backward, forward_only, interleaved_samples, machine_description, over_ranks,
                           peak_memory_mb, pin_mmap_threshold)
from layer_impls import (CAPACITY, CONFIGS, IMPLS, LayerSpec, ReferenceWeights, rank_device,
                         rank_context, rank_input)
from moe_ep.parallel.spawn import run_on_ranks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BOUND = "dense_bound"


def _specs(opts: dict) -> list[tuple[str, LayerSpec]]:
    """(name, LayerSpec) of the selected configurations with the size overrides applied."""
    overrides = {k: opts[k] for k in ("tokens", "hidden", "ffn") if opts[k] is not None}
    return [(name, CONFIGS[name].replace(**overrides)) for name in opts["configs"]]


def _cases(rank: int, world: int, opts: dict, eps: list[int]):
    """(config name, spec, weights, x_TH, dtype name, context) of every case at the given EP sizes."""
    device = rank_device(rank, opts["device"])
    for ep in eps:
        ctx = rank_context(rank, ep, device, torch.float32)
        for name, spec in _specs(opts):
            weights, x_TH = ReferenceWeights.random(spec), rank_input(spec, rank)
            for dtype_name in opts["dtypes"]:
                yield name, spec, weights, x_TH, dtype_name, dataclasses.replace(ctx, dtype=DTYPES[dtype_name])


# ------------------------------------------------------------ rank workers
def _timing_rank(rank: int, world: int, opts: dict) -> dict:
    """Interleaved samples of every implementation, every case; plain values.

    Wall samples are the same on every rank (barriers); CPU samples are the
    maximum over ranks of each iteration.
    """
    records, machine = [], None
    for name, spec, weights, x_TH, dtype_name, ctx in _cases(rank, world, opts, [world]):
        machine = machine or machine_description(ctx.device)
        load = os.getloadavg()[0]
        impls = {impl: IMPLS[impl](spec, weights, ctx, x_TH) for impl in opts["impls"]}
        steps = {(impl, "fwd"): partial(forward_only, built) for impl, built in impls.items()}
        steps.update({(impl, "step"): partial(forward_backward, built) for impl, built in impls.items()})
        samples = interleaved_samples(steps, opts["iters"], opts["warmup"], ctx.device)
        for impl, built in impls.items():
            dropped = built.dropped_fraction()
            record = dict(impl=impl, config=name, label=spec.label, ep=world, dtype=dtype_name,
                          **dataclasses.asdict(spec), load_avg_1m=load, capacity=CAPACITY[impl],
                          dropped_frac=None if dropped is None else over_ranks([dropped], "mean")[0])
            for step in ("fwd", "step"):
                wall_s, cpu_s = zip(*samples[impl, step])
                record[f"{step}_samples_ms"] = [s * 1e3 for s in wall_s]
                record[f"{step}_cpu_samples_ms"] = over_ranks([s * 1e3 for s in cpu_s], "max")
            records.append(record)
        del impls, steps
        gc.collect()
    return {"records": records, "machine": machine}


def _memory_rank(rank: int, world: int, opts: dict, impl: str) -> list[dict]:
    """Peak memory of one forward+backward of ``impl`` above the level before it, max over ranks,
    at every EP size (``world`` is the largest; at ep 1 each rank runs a layer of its own)."""
    out = []
    pin_mmap_threshold()
    for name, spec, weights, x_TH, dtype_name, ctx in _cases(rank, world, opts, opts["ep"]):
        built = IMPLS[impl](spec, weights, ctx, x_TH)
        forward_backward(built)  # warm-up: one-time allocations stay out of the measured step
        peak = peak_memory_mb(partial(forward_backward, built), ctx.device)
        out.append(dict(impl=impl, config=name, ep=ctx.ep, dtype=dtype_name,
                        peak_mem_mb=over_ranks([peak], "max")[0]))
        del built
        gc.collect()
    return out


def _profile_rank(rank: int, world: int, opts: dict, impl: str) -> str:
    """torch.profiler tables (top ops by self CPU time) of ``impl``'s forward and forward+backward."""
    from torch.profiler import ProfilerActivity, profile

    name, spec, weights, x_TH, dtype_name, ctx = next(_cases(rank, world, opts, [world]))
    built = IMPLS[impl](spec, weights, ctx, x_TH)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    text = [f"== {impl} {spec.label}, ep {world}, {dtype_name}, {spec.tokens} tokens/rank, rank {rank} =="]
    for title, step in (("forward (no grad)", forward_only), ("forward+backward", forward_backward)):
        for _ in range(opts["warmup"] + 1):
            step(built)
        with profile(activities=activities) as prof:
            for _ in range(opts["iters"]):
                step(built)
        text.append(f"-- {title}, {opts['iters']} iterations, sorted by self CPU time --")
        text.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=opts["profile_rows"]))
    return "\n".join(text)


# ------------------------------------------------------------- the driver
def _launch(fn, ep: int, opts: dict, *args):
    env = {"DS_ACCELERATOR": opts["device"]}  # read when deepspeed is imported, in the rank processes
    backend = "cpu:gloo,cuda:nccl" if opts["device"] == "cuda" else "gloo"  # gloo cannot move CUDA tensors
    return run_on_ranks(fn, ep, opts, *args, timeout=opts["timeout"], env=env, backend=backend)


def _finish_records(records: list[dict], peaks: dict) -> list[dict]:
    """Medians, tokens/s, peak memory and the ratios to the dense bound of the same case."""
    by_case = {}
    for r in records:
        for key in ("fwd", "step", "fwd_cpu", "step_cpu"):
            r[f"{key}_ms"] = statistics.median(r[f"{key}_samples_ms"])
        tokens = r["tokens"] * r["ep"]  # every rank's tokens
        r["fwd_tokens_per_s"], r["tokens_per_s"] = tokens / r["fwd_ms"] * 1e3, tokens / r["step_ms"] * 1e3
        r["peak_mem_mb"] = peaks[r["impl"], r["config"], r["ep"], r["dtype"]]
        by_case.setdefault((r["config"], r["ep"], r["dtype"]), {})[r["impl"]] = r
    for case in by_case.values():
        bound = case.get(BOUND)
        for r in case.values():
            for ratio, key in (("fwd_bound_ratio", "fwd_ms"), ("bound_ratio", "step_ms"),
                               ("fwd_cpu_bound_ratio", "fwd_cpu_ms"), ("cpu_bound_ratio", "step_cpu_ms")):
                r[ratio] = r[key] / bound[key] if bound else None
    return records


def run_benchmark(opts: dict) -> tuple[list[dict], dict]:
    """(records, machine description) of every selected case."""
    records, peaks, machine = [], {}, None
    for ep in opts["ep"]:
        timing = _launch(_timing_rank, ep, opts)[0]
        records += timing["records"]
        machine = machine or timing["machine"]
    for impl in opts["impls"]:
        for m in _launch(_memory_rank, max(opts["ep"]), opts, impl)[0]:
            peaks[m["impl"], m["config"], m["ep"], m["dtype"]] = m["peak_mem_mb"]
    return _finish_records(records, peaks), machine


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(records: list[dict], machine: dict) -> None:
    print(f"machine: {machine['cpu']} ({machine['cpu_cores']} cores, {machine['cpu_capability']}), "
          f"{machine.get('gpu', 'no GPU')}; torch {machine['torch']}, deepspeed {machine['deepspeed']}; "
          f"{machine['threads_per_rank']} thread(s) per rank")
    print(f"bf16: {machine['bf16_note']}")
    groups = {}
    for r in records:
        groups.setdefault((r["ep"], r["dtype"]), []).append(r)
    header = (f"{'config':<36}{'impl':<19}{'fwd ms':>8}{'fwd+bwd ms':>11}{'tokens/s':>9}{'fwd/bound':>10}"
              f"{'step/bound':>11}{'cpu fwd/b':>10}{'cpu step/b':>11}{'peak MiB':>9}{'dropped':>8}")
    for (ep, dtype), rows in groups.items():
        r0, loads = rows[0], [r["load_avg_1m"] for r in rows]
        print(f"\nep {ep}, {dtype}, {r0['tokens']} tokens/rank, hidden {r0['hidden']}, capacity factor "
              f"{r0['capacity_factor']}, medians of {len(r0['step_samples_ms'])} interleaved iterations, "
              f"load average {min(loads):.1f}-{max(loads):.1f} on {machine['cpu_cores']} cores")
        print(header)
        for r in rows:
            dropped = None if r["dropped_frac"] is None else 100 * r["dropped_frac"]
            print(f"{r['label']:<36}{r['impl']:<19}{r['fwd_ms']:>8.1f}{r['step_ms']:>11.1f}{r['tokens_per_s']:>9.0f}"
                  f"{_fmt(r['fwd_bound_ratio'], '.2f'):>10}{_fmt(r['bound_ratio'], '.2f'):>11}"
                  f"{_fmt(r['fwd_cpu_bound_ratio'], '.2f'):>10}{_fmt(r['cpu_bound_ratio'], '.2f'):>11}"
                  f"{r['peak_mem_mb']:>9.0f}{_fmt(dropped, '.1f'):>7}%")
    print("\nx/bound: wall-time ratio to the dense bound of the same case; cpu x/bound: the same with each rank's "
          "CPU time (max over ranks), steadier when other jobs load the machine")
    print("capacity and dropping:")
    for impl in dict.fromkeys(r["impl"] for r in records):
        print(f"  {impl}: {CAPACITY[impl]}")


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                   help="configurations (default: all; --profile: e64k6)")
    p.add_argument("--ep", nargs="+", type=int, default=[1, 2],
                   help="expert-parallel sizes, one process per rank (default 1 2)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                   help="default: fp32 bf16 (--quick, --profile: fp32)")
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=None,
                   help="default: all (--profile: moe_ep)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per rank, NCCL")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 7; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; --quick 1)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 4096; --quick 1024)")
    p.add_argument("--hidden", type=int, default=None, help="override every configuration's hidden size (512)")
    p.add_argument("--ffn", type=int, default=None, help="override every configuration's expert width")
    p.add_argument("--quick", action="store_true", help="fp32, 1024 tokens/rank, 3 iterations: < 3 min on CPU")
    p.add_argument("--json", default=None, help="write the records (a JSON list) here")
    p.add_argument("--plot", default=None, help="write the PNG plots into this folder (see plot_layer.py)")
    p.add_argument("--profile", action="store_true",
                   help="instead of the benchmark: torch.profiler over moe_ep's forward and forward+backward")
    p.add_argument("--profile-rows", type=int, default=25, help="ops listed per --profile table (default 25)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds before a process group counts as hung (default 3600)")
    opts = vars(p.parse_args(argv))
    if opts["device"] == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False (no GPU visible, or a CPU-only torch build)")
    if opts["device"] == "cuda" and max(opts["ep"]) > torch.cuda.device_count():
        p.error(f"--ep {max(opts['ep'])} needs that many GPUs; {torch.cuda.device_count()} visible")
    if min(opts["ep"]) < 1 or any(v is not None and v < 1 for v in (opts["tokens"], opts["hidden"], opts["ffn"])):
        p.error("--ep, --tokens, --hidden and --ffn must be positive")
    if any(max(opts["ep"]) % ep for ep in opts["ep"]):
        p.error(f"--ep {opts['ep']}: every size must divide the largest (peak memory is measured for all of them "
                f"in one process group per implementation)")
    opts["ep"] = sorted(set(opts["ep"]))
    light = opts["quick"] or opts["profile"]
    opts["configs"] = opts["configs"] or (["e64k6"] if opts["profile"] else list(CONFIGS))
    opts["impls"] = opts["impls"] or (["moe_ep"] if opts["profile"] else list(IMPLS))
    opts["dtypes"] = opts["dtypes"] or (["fp32"] if light else list(DTYPES))
    opts["iters"] = opts["iters"] if opts["iters"] is not None else (3 if light else 7)
    opts["warmup"] = opts["warmup"] if opts["warmup"] is not None else (1 if light else 2)
    if opts["quick"] and opts["tokens"] is None:
        opts["tokens"] = 1024
    if opts["iters"] < 1 or opts["warmup"] < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    for name in opts["configs"]:
        bad = [ep for ep in opts["ep"] if CONFIGS[name].n_experts % ep]
        if bad:
            p.error(f"config {name}: {CONFIGS[name].n_experts} experts do not divide over ep {bad}")
    return opts


def main(argv=None) -> None:
    opts = parse_args(argv)
    if opts["profile"]:
        for ep in opts["ep"]:
            for impl in opts["impls"]:
                print(_launch(_profile_rank, ep, opts, impl)[0])
        return
    records, machine = run_benchmark(opts)
    for r in records:
        r["machine"] = machine
    print_tables(records, machine)
    if opts["json"]:
        path = pathlib.Path(opts["json"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1))
    if opts["plot"]:
        from plot_layer import plot_records
        for png in plot_records(records, opts["plot"]):
            print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())

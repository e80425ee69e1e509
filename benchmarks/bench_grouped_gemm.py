"""Benchmark moe_ep.kernels against torch._grouped_mm, a per-expert loop and one dense GEMM.

Projections of DeepSeek expert FFNs (hidden H, intermediate I):

* ``up``   [T, H] x [E, H, 2I]   (gate and up projections in one GEMM)
* ``down`` [T, I] x [E, I, H]
* ``ffn``  the whole gathered SwiGLU FFN: ``moe_ep.expert_ffn`` (Triton, fused) vs the same steps unfused

Methods per GEMM: ``triton`` (moe_ep.kernels.grouped_mm), ``torch_grouped_mm``
(``torch._grouped_mm`` with ``offs = cumsum(counts)``, computed inside the timed call),
``loop`` (one matmul per expert, including the ``counts.tolist()`` it needs) and
``dense`` (one GEMM [T, K] x [K, N] of the same FLOPs). For ``ffn``: ``triton_fused``,
``triton_unfused``, ``torch_unfused`` and ``dense`` (two dense GEMMs and the activation). Every rate is
also given as a ratio to the ``dense`` rate measured in the same run for the same
shape and mode (forward, or forward+backward = 3x the forward FLOPs).

On CUDA everything is timed with CUDA events. On CPU (``--quick``; tiny shapes) the
Triton methods cannot be timed: they run once under the Triton interpreter and only
their correctness against a float64 reference is reported, labelled as such.

    python benchmarks/bench_grouped_gemm.py --out runs/bench.json                # GPU sweep
    python benchmarks/bench_grouped_gemm.py --quick --out runs/bench_cpu.json    # CPU smoke test
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

MODELS = {"v2-lite": (2048, 1408), "v2": (5120, 1536), "v3": (7168, 2048)}
QUICK_MODELS = {"tiny": (256, 128)}
GEMM_METHODS = ("triton", "torch_grouped_mm", "loop", "dense")
FFN_METHODS = ("triton_fused", "triton_unfused", "torch_unfused", "dense")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INTERPRETER_MAX_MACS = 2**24  # larger Triton cases are skipped on CPU: the interpreter is too slow


def make_counts(num_experts: int, tokens_per_expert: int, dist: str) -> list[int]:
    """Rows per expert summing to E * tokens_per_expert; ``skewed`` is Zipf(1) over experts."""
    total = num_experts * tokens_per_expert
    if dist == "uniform":
        return [tokens_per_expert] * num_experts
    weights = [1.0 / (e + 1) for e in range(num_experts)]
    counts = [int(total * w / sum(weights)) for w in weights]
    counts[0] += total - sum(counts)
    return counts


# ---------------------------------------------------------------- timing

def time_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()``: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    want = want.double()
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def make_step(forward, inputs: tuple, leaves: tuple, dy: torch.Tensor, mode: str):
    """A closure running ``forward(*inputs)`` (``fwd``) or forward + grads of ``leaves`` (``fwdbwd``)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return (forward(*inputs),)
        return step

    def step():  # the dense bound uses no gate weight: its gradient is materialised as zeros
        return torch.autograd.grad(forward(*inputs), leaves, dy, allow_unused=True, materialize_grads=True)
    return step


# ---------------------------------------------------------------- one projection: [T, K] x [E, K, N]

def gemm_forward(method: str, x_TK, w, counts_E):
    """One grouped GEMM; ``dense`` gets a single [K, N] weight instead of [E, K, N]."""
    if method == "triton":
        from moe_ep.kernels.grouped_mm import grouped_mm
        return grouped_mm(x_TK, w, counts_E)
    if method == "torch_grouped_mm":
        return torch._grouped_mm(x_TK, w, offs=torch.cumsum(counts_E, 0).to(torch.int32))
    if method == "loop":
        parts = torch.split(x_TK, counts_E.tolist())
        return torch.cat([part @ w[e] for e, part in enumerate(parts)])
    if method == "dense":
        return x_TK @ w
    raise ValueError(f"unknown GEMM method {method!r}")


def gemm_steps(counts: list[int], k: int, n: int, dtype, device, mode: str):
    """(``step(method)`` -> timed closure, ``triton_error()`` -> float64 check) for one projection."""
    gen = torch.Generator(device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    x_TK = rand(sum(counts), k).div_(k**0.5).to(dtype).requires_grad_()
    w_EKN = rand(len(counts), k, n).to(dtype).requires_grad_()
    w_KN = w_EKN[0].detach().clone().requires_grad_()
    dy_TN = rand(sum(counts), n).to(dtype)
    counts_E = torch.tensor(counts, device=device)

    def step(method):
        weight = w_KN if method == "dense" else w_EKN
        return make_step(lambda x, w: gemm_forward(method, x, w, counts_E), (x_TK, weight), (x_TK, weight),
                         dy_TN, mode)

    def triton_error():
        x64, w64 = (t.detach().double().requires_grad_() for t in (x_TK, w_EKN))
        want = make_step(lambda x, w: gemm_forward("loop", x, w, counts_E), (x64, w64), (x64, w64),
                         dy_TN.double(), mode)()
        return max(relative_error(g, w) for g, w in zip(step("triton")(), want))

    return step, triton_error


# ---------------------------------------------------------------- whole gathered SwiGLU FFN

def ffn_forward(method: str, x_src, row_index, counts_E, w_gate_up, w_down, row_weight):
    """``moe_ep.expert_ffn`` on the Triton backend (gather, SwiGLU and gate weight fused into the first
    GEMM, its own backward), or index_select + GEMM + SwiGLU + GEMM + gate weight + index_add with one
    GEMM method and autograd."""
    if method == "triton_fused":
        from moe_ep.expert_ffn import expert_ffn
        return expert_ffn(x_src, row_index, counts_E, row_weight, w_gate_up, w_down, "swiglu", backend="triton")
    gemm = {"triton_unfused": "triton", "torch_unfused": "torch_grouped_mm", "loop_unfused": "loop"}.get(method)
    inter = w_down.shape[-2]
    if method == "dense":  # the bound: two GEMMs and the activation, no gather, gate weight or scatter
        gu = x_src @ w_gate_up
        return (F.silu(gu[:, :inter]) * gu[:, inter:]) @ w_down
    gu = gemm_forward(gemm, x_src.index_select(0, row_index), w_gate_up, counts_E)
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    y_RH = gemm_forward(gemm, h, w_down, counts_E) * row_weight[:, None].to(h.dtype)
    return torch.zeros_like(x_src).index_add_(0, row_index, y_RH)


def ffn_steps(counts: list[int], hidden: int, inter: int, dtype, device, mode: str):
    """(``step(method)`` -> timed closure, ``triton_error()`` -> float64 check) for the whole FFN."""
    gen = torch.Generator(device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    rows, experts = sum(counts), len(counts)
    x_src = rand(rows, hidden).to(dtype).requires_grad_()
    row_index = torch.randperm(rows, generator=gen, device=device)
    w_gate_up = rand(experts, hidden, 2 * inter).div_(hidden**0.5).to(dtype)
    w_down = rand(experts, inter, hidden).div_(inter**0.5).to(dtype)
    weights = tuple(w.requires_grad_() for w in (w_gate_up, w_down))
    dense_weights = tuple(w[0].detach().clone().requires_grad_() for w in weights)
    row_weight = torch.rand(rows, generator=gen, device=device).requires_grad_()
    dy = rand(rows, hidden).to(dtype)
    counts_E = torch.tensor(counts, device=device)

    def run(method, x, wgu, wd, rw, grad):
        inputs = (x, row_index, counts_E, wgu, wd, rw)
        return make_step(lambda *a: ffn_forward(method, *a), inputs, (x, wgu, wd, rw), grad, mode)

    def step(method):
        wgu, wd = dense_weights if method == "dense" else weights
        return run(method, x_src, wgu, wd, row_weight, dy)

    def triton_error():
        leaves64 = [t.detach().double().requires_grad_() for t in (x_src, *weights, row_weight)]
        want = run("loop_unfused", *leaves64, dy.double())()
        return max(relative_error(g, w) for g, w in zip(step("triton_fused")(), want))

    return step, triton_error


# ---------------------------------------------------------------- sweep

def measure(case: dict, args, device, dtype) -> list[dict]:
    """Records for every (mode, method) of one case; rates relative to the same run's dense rate."""
    hidden, inter = case["hidden"], case["inter"]
    rows = sum(case["counts"])
    if case["proj"] == "ffn":
        methods, fwd_flops, macs = FFN_METHODS, 6 * rows * hidden * inter, 3 * rows * hidden * inter
        build = lambda mode: ffn_steps(case["counts"], hidden, inter, dtype, device, mode)  # noqa: E731
    else:
        k, n = (hidden, 2 * inter) if case["proj"] == "up" else (inter, hidden)
        methods, fwd_flops, macs = GEMM_METHODS, 2 * rows * k * n, rows * k * n
        build = lambda mode: gemm_steps(case["counts"], k, n, dtype, device, mode)  # noqa: E731
    records = []
    for mode in args.modes:
        step, triton_error = build(mode)
        flops = fwd_flops * (3 if mode == "fwdbwd" else 1)
        mode_records = []
        for method in methods:
            rec = {**{key: case[key] for key in ("model", "proj", "experts", "tokens_per_expert", "dist")},
                   "rows": rows, "mode": mode, "method": method, "ms": None, "tflops": None,
                   "vs_dense": None, "max_rel_err": None}
            try:
                if method.startswith("triton") and not args.triton:
                    rec["status"] = "skipped: triton not importable"
                elif method.startswith("triton") and device.type != "cuda":
                    if method == "triton_unfused":
                        rec["status"] = "skipped: not timeable on CPU (its kernels are checked in up/down)"
                    elif macs > INTERPRETER_MAX_MACS:
                        rec["status"] = "skipped: not timeable on CPU, too large to interpret"
                    else:
                        rec["status"] = "interpreter-correctness"
                        rec["max_rel_err"] = triton_error()
                else:
                    rec["ms"] = time_ms(step(method), device, args.warmup, args.iters)
                    rec["tflops"] = flops / rec["ms"] / 1e9
                    rec["status"] = "timed"
            except (RuntimeError, NotImplementedError) as err:
                rec["status"] = f"error: {str(err).splitlines()[0][:120]}"
            mode_records.append(rec)
        dense = next(r["tflops"] for r in mode_records if r["method"] == "dense")
        for rec in mode_records:
            if rec["tflops"] is not None and dense:
                rec["vs_dense"] = rec["tflops"] / dense
        records += mode_records
    return records


def iter_cases(args, shapes: dict):
    for model in args.models:
        hidden, inter = shapes[model]
        for experts in args.experts:
            for tokens in args.tokens:
                for dist in args.dists:
                    for proj in args.projs:
                        yield {"model": model, "hidden": hidden, "inter": inter, "proj": proj,
                               "experts": experts, "tokens_per_expert": tokens, "dist": dist,
                               "counts": make_counts(experts, tokens, dist)}


def format_row(rec: dict) -> str:
    if rec["status"] == "timed":
        result = f"{rec['ms']:10.3f} {rec['tflops']:9.3f} {rec['vs_dense']:8.2f}x"
    elif rec["status"] == "interpreter-correctness":
        result = f"  interpreter (correctness only, not timed): max rel err {rec['max_rel_err']:.1e}"
    else:
        result = f"  {rec['status']}"
    return (f"{rec['model']:8} {rec['proj']:5} {rec['experts']:3} {rec['tokens_per_expert']:6} "
            f"{rec['dist']:8} {rec['mode']:7} {rec['method']:17}{result}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (H=256, I=128), E=8, 16..256 tokens/expert: a CPU smoke test")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS) + sorted(QUICK_MODELS))
    parser.add_argument("--experts", nargs="+", type=int, help="local experts (default 8 32)")
    parser.add_argument("--tokens", nargs="+", type=int, help="tokens per expert (default 128..4096)")
    parser.add_argument("--dists", nargs="+", default=["uniform", "skewed"], choices=("uniform", "skewed"))
    parser.add_argument("--projs", nargs="+", default=["up", "down", "ffn"], choices=("up", "down", "ffn"))
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=("fwd", "fwdbwd"))
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per measurement")
    parser.add_argument("--iters", type=int, help="timed calls per measurement, median reported (20 cuda, 30 cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch on --device cpu (1 keeps timings steady on a shared machine)")
    parser.add_argument("--out", help="write the records and run metadata as JSON here")
    args = parser.parse_args(argv)
    on_cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.models = args.models or (list(QUICK_MODELS) if args.quick else list(MODELS))
    args.experts = args.experts or ([8] if args.quick else [8, 32])
    args.tokens = args.tokens or ([16, 64, 256] if args.quick else [128, 256, 512, 1024, 2048, 4096])
    args.iters = args.iters or (20 if on_cuda else 30)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # Set before moe_ep.kernels first imports Triton: CPU tensors only run in its interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(args.threads)
    from moe_ep.kernels.runtime import triton_available

    args.triton = triton_available()
    if not args.triton:
        print("triton is not importable: the triton* methods are skipped")
    print(f"device={device} ({device_name(device)}) dtype={args.dtype} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    print(f"{'model':8} {'proj':5} {'E':>3} {'tok/E':>6} {'dist':8} {'mode':7} {'method':17}"
          f"{'ms':>10} {'TFLOP/s':>9} {'vs dense':>9}")
    records = []
    for case in iter_cases(args, {**MODELS, **QUICK_MODELS}):
        for rec in measure(case, args, device, DTYPES[args.dtype]):
            print(format_row(rec), flush=True)
            records.append(rec)
    if args.out:
        meta = {"device": str(device), "device_name": device_name(device), "dtype": args.dtype,
                "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "warmup": args.warmup, "iters": args.iters,
                "quick": args.quick}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "results": records}, fh, indent=1)
        print(f"wrote {len(records)} records to {args.out}")
    return records


if __name__ == "__main__":
    main()

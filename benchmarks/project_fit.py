"""CPU validation of project.py's model: fit it on micro-benchmarks, predict bench_scaling.py's runs.

Fitted here, with P = 1, 2, 4 processes (gloo, one thread each) running at
once on the shared cores, as in the scaling runs:

* gloo ``all_to_all_single``: ``t = alpha_P + bytes / bw_P`` by least
  squares over messages of 1 to 2048 rows per destination (``bytes``: what
  one rank sends to the others);
* the GEMM rate ``rate_P`` (FLOP/s per process) of the experts' two
  products at the shape each run computes (E/P local experts of
  ``rows_e = T K P / E`` rows each, one product per expert as the CPU
  backend does), every process multiplying at once.

The same model as ``project.py`` then predicts each run (``step`` =
``comm`` + ``experts`` + ``rest``):

    comm    = n_a2a * alpha_P + 4 * T remote_bytes_per_token / bw_P
              (n_a2a: moe_ep flat 10 = counts, rows, routing rows, combine forward + 3 backward + 3 of the
              owners' capacity decision; two-hop 17; DeepSpeed 4; remote bytes as bench_scaling measured them)
    experts = 3 * 2 * 2 * T K H I / rate_P(rows_e)  (GELU FFN: two products; DeepSpeed: its padded buffers)
    rest    = c_impl * T * rate_P1 / rate_P         (rate_P1: 1 process, same rows_e; c_impl: per-token time
              of everything else, the ONE quantity calibrated on a scaling run: the 1-process weak run
              of the same implementation, minus its predicted experts)
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from moe_ep.parallel.spawn import run_on_ranks

A2A_CALLS = {"moe_ep": 10, "moe_ep_dev_M1": 10, "moe_ep_2hop": 17, "moe_ep_node_M1": 17, "deepspeed": 4}
ROWS_PER_DEST = (1, 16, 128, 512, 2048)


def _median_time(fn, iters: int) -> float:
    fn()
    samples = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _micro_rank(rank: int, world: int, hidden: int, ffn: int, experts: int, rows_e: list[int], iters: int) -> dict:
    """(bytes sent to others, seconds) of all-to-alls, and this process's GEMM FLOP/s per ``rows_e`` (E/world
    local experts of that many rows each) with every rank multiplying at once."""
    torch.set_num_threads(1)
    points = []
    if world > 1:
        for rows in ROWS_PER_DEST:
            x = torch.randn(rows * world, hidden)
            out = torch.empty_like(x)
            t = _median_time(lambda: dist.all_to_all_single(out, x), iters)
            points.append((rows * (world - 1) * hidden * 4, t))
    n_local = experts // world
    w_in, w_out = torch.randn(n_local, hidden, ffn), torch.randn(n_local, ffn, hidden)
    rates = {}
    for rows in rows_e:
        x = torch.randn(rows, hidden)
        t = _median_time(lambda: [(x @ w_in[e]) @ w_out[e] for e in range(n_local)], iters)
        rates[rows] = 2 * 2 * n_local * rows * hidden * ffn / t
    return dict(points=points, gemm_flops=rates)


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``t = alpha + bytes / bw``: (alpha seconds, bw bytes/s)."""
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sum((p[0] - mx) ** 2 for p in points)
    return max(my - slope * mx, 0.0), 1.0 / slope


def rows_per_expert(record: dict) -> int:
    """Rows each local expert computes on average: T K P / E."""
    return max(1, round(record["tokens_per_rank"] * record["top_k"] * record["procs"] / record["n_experts"]))


def fit_cpu(records: list[dict], iters: int = 5) -> dict[int, dict]:
    """{P: alpha, bw, rate {rows_e: FLOP/s}} fitted with P processes running at once, for every P of
    ``records`` and 1 (rates at every rows_e the P-process runs need)."""
    r0 = records[0]
    procs = sorted({r["procs"] for r in records} | {1})
    params = {}
    for P in procs:
        rows_e = sorted({rows_per_expert(r) for r in records if P == 1 or r["procs"] == P})
        ranks = run_on_ranks(_micro_rank, P, r0["hidden"], r0["ffn"], r0["n_experts"], rows_e, iters, timeout=900)
        rate = {rows: statistics.median(r["gemm_flops"][rows] for r in ranks) for rows in rows_e}
        alpha, bw = fit_line([pt for r in ranks for pt in r["points"]]) if P > 1 else (0.0, None)  # no all-to-all
        params[P] = dict(alpha=alpha, bw=bw, rate=rate)
    return params


def _family(impl: str) -> str:
    return "deepspeed" if impl == "deepspeed" else "moe_ep"


def predict(record: dict, params: dict[int, dict], rest_per_token: dict[str, float]) -> dict:
    """Predicted comm / experts / rest / step seconds of one bench_scaling record (module docstring)."""
    P, T = record["procs"], record["tokens_per_rank"]
    fit, rows_e = params[P], rows_per_expert(record)
    comm = 0.0
    if P > 1:
        comm = A2A_CALLS[record["impl"]] * fit["alpha"] + 4 * T * record["remote_bytes_per_token"] / fit["bw"]
    experts = 3 * 2 * 2 * T * record["top_k"] * record["hidden"] * record["ffn"] / fit["rate"][rows_e]
    rest = rest_per_token[_family(record["impl"])] * T * _rate_at(params[1]["rate"], rows_e) / fit["rate"][rows_e]
    return dict(comm=comm, experts=experts, rest=rest, step=comm + experts + rest)


def _rate_at(rates: dict[int, float], rows_e: int) -> float:
    """The 1-process rate at ``rows_e`` rows per expert (the nearest measured size)."""
    return rates[min(rates, key=lambda r: abs(r - rows_e))]


def validate(bench: dict, plot_dir: str | None = None) -> dict:
    """Fit, predict every record of a bench_scaling.py JSON, print prediction beside measurement."""
    records = bench["records"]
    r0 = records[0]
    print(f"\nCPU validation: fitting gloo all-to-all and the experts' GEMM rate with 1, 2, 4 processes at once "
          f"(hidden {r0['hidden']}, ffn {r0['ffn']}, {r0['n_experts']} experts) ...")
    params = fit_cpu(records)
    for P, f in params.items():
        rates = ", ".join(f"{rows} rows {rate / 1e9:.1f}" for rows, rate in f["rate"].items())
        a2a = f"alpha {f['alpha'] * 1e6:5.0f} us, bandwidth {f['bw'] / 1e9:5.2f} GB/s" if f["bw"] else "no all-to-all"
        print(f"  P={P}: {a2a}; GEMM GFLOP/s per process at rows/expert: {rates}")
    base = {}
    for r in records:
        if r["procs"] == 1 and r["mode"] == "weak":
            experts = predict(r, params, {"moe_ep": 0.0, "deepspeed": 0.0})["experts"]
            base[_family(r["impl"])] = max(r["step_ms"] * 1e-3 - experts, 0.0) / r["tokens_per_rank"]
    rows = []
    print(f"\n{'mode':<7}{'impl':<16}{'P':>3}{'measured ms':>12}{'predicted ms':>13}{'error':>8}"
          f"{'comm meas/pred':>16}{'experts meas/pred':>19}{'note':>12}")
    for r in records:
        if _family(r["impl"]) not in base:
            continue
        pred = predict(r, params, base)
        err = pred["step"] * 1e3 / r["step_ms"] - 1
        note = "calibration" if (r["procs"] == 1 and r["mode"] == "weak") else ""
        rows.append(dict(mode=r["mode"], impl=r["impl"], procs=r["procs"], tokens_per_rank=r["tokens_per_rank"],
                         measured_ms=r["step_ms"], predicted_ms=pred["step"] * 1e3, error=err,
                         measured_comm_ms=r["comm_ms"], predicted_comm_ms=pred["comm"] * 1e3,
                         measured_experts_ms=r["experts_ms"], predicted_experts_ms=pred["experts"] * 1e3,
                         calibration=bool(note)))
        print(f"{r['mode']:<7}{r['impl']:<16}{r['procs']:>3}{r['step_ms']:>12.1f}{pred['step'] * 1e3:>13.1f}"
              f"{100 * err:>7.0f}%{r['comm_ms']:>8.1f}/{pred['comm'] * 1e3:<7.1f}"
              f"{r['experts_ms']:>10.1f}/{pred['experts'] * 1e3:<8.1f}{note:>12}")
    checked = [abs(x["error"]) for x in rows if not x["calibration"]]
    print(f"\n|error| over the {len(checked)} predicted runs: median {100 * statistics.median(checked):.0f}%, "
          f"max {100 * max(checked):.0f}%; within 25%: {sum(e <= 0.25 for e in checked)} of {len(checked)}")
    if plot_dir:
        print(f"wrote {_plot(rows, plot_dir)}")
    params_json = {str(P): dict(f, rate={str(k): v for k, v in f["rate"].items()}) for P, f in params.items()}
    return dict(params=params_json, rest_per_token_s=base, runs=rows)


def _plot(rows: list[dict], out_dir: str):
    import pathlib

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for mode, marker in (("weak", "o"), ("strong", "s")):
        pts = [(x["measured_ms"], x["predicted_ms"]) for x in rows if x["mode"] == mode and not x["calibration"]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{mode} scaling runs")
    top = max(max(x["measured_ms"], x["predicted_ms"]) for x in rows) * 1.1
    ax.plot([0, top], [0, top], "k-", lw=0.8, label="prediction = measurement")
    ax.fill_between([0, top], [0, 0.75 * top], [0, 1.25 * top], color="gray", alpha=0.15, label="within 25%")
    ax.set_xlabel("measured step, ms (CPU, gloo)")
    ax.set_ylabel("predicted step, ms")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = pathlib.Path(out_dir) / "projection_validation.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def validate_overlap(records: list[dict]) -> dict:
    """Predict ``bench_overlap.py``'s forward+backward steps with ``overlap_model`` from its own measured parts.

    Per layout and chunk count c: the forward's compute and link time are the run's ``compute_ms`` and
    ``comm_ms`` of mode ``fwd``, the backward's the ``fwd+bwd`` ones minus them; each phase's link time is two
    passes (dispatch and combine) of c chunks on one link, its compute c equal chunks. The prediction of
    c = 1 is compute + link (nothing hidden); of c > 1 the pipelined schedule. Nothing is fitted.
    """
    from overlap_model import Phase, backward_time, forward_time

    by_key = {(r["ep"], r["nodes"], r["chunks"], r["mode"]): r for r in records}
    rows = []
    print("\noverlap model against bench_overlap.py (emulated links), forward+backward:")
    print(f"{'layout':<7}{'c':>3}{'measured ms':>13}{'predicted ms':>14}{'error':>8}")
    for (ep, nodes, chunks, mode), both in sorted(by_key.items()):
        if mode != "fwd+bwd":
            continue
        fwd = by_key[(ep, nodes, chunks, "fwd")]
        phases = []
        for compute_ms, comm_ms in ((fwd["compute_ms"], fwd["comm_ms"]),
                                    (both["compute_ms"] - fwd["compute_ms"], both["comm_ms"] - fwd["comm_ms"])):
            phases.append(Phase(outer_s=comm_ms * 1e-3 / (2 * chunks), inner_s=0.0,
                                compute_s=compute_ms * 1e-3 / chunks))
        predicted = (forward_time(phases[0], chunks) + backward_time(phases[1], chunks)) * 1e3
        err = predicted / both["step_ms"] - 1
        layout = "ep2" if nodes == ep else f"{nodes}x{ep // nodes}"
        rows.append(dict(layout=layout, chunks=chunks, measured_ms=both["step_ms"], predicted_ms=predicted,
                         error=err))
        print(f"{layout:<7}{chunks:>3}{both['step_ms']:>13.1f}{predicted:>14.1f}{100 * err:>7.0f}%")
    errors = [abs(r["error"]) for r in rows]
    print(f"|error| over {len(rows)} runs: median {100 * statistics.median(errors):.0f}%, "
          f"max {100 * max(errors):.0f}%")
    return dict(runs=rows)

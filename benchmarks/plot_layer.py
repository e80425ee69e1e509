"""Plots and tables of ``bench_layer.py`` records: forward+backward time and peak memory per implementation.

    python benchmarks/plot_layer.py docs/data/bench_layer_cpu.json --out docs/img
    python benchmarks/plot_layer.py docs/data/bench_layer_cpu.json --markdown

writes ``bench_layer_<device>_time.png`` (wall-clock medians, bars per
implementation and configuration, the dense bound as a black line across
each group) and ``bench_layer_<device>_memory.png`` (peak memory above the
pre-forward level, the dense bound as a bar), one panel per (dtype, ep);
``--markdown`` prints the tables of docs/performance.md instead.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

BOUND = "dense_bound"
COLORS = {"moe_ep": "tab:blue", "moe_ep_recompute": "tab:cyan", "deepspeed": "tab:orange", "textbook": "tab:green",
          "expert_gemm_bound": "0.35", BOUND: "0.6"}


def _panels(records: list[dict]) -> tuple[list[str], list[int]]:
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    eps = sorted({r["ep"] for r in records})
    return dtypes, eps


def _figure(records: list[dict], metric: str, ylabel: str, bound_as_line: bool, title: str):
    dtypes, eps = _panels(records)
    fig, axes = plt.subplots(len(dtypes), len(eps), figsize=(6.5 * len(eps), 4.2 * len(dtypes)), squeeze=False)
    for row, dtype in enumerate(dtypes):
        for col, ep in enumerate(eps):
            ax = axes[row][col]
            panel = [r for r in records if r["dtype"] == dtype and r["ep"] == ep]
            configs = list(dict.fromkeys(r["config"] for r in panel))
            labels = {r["config"]: r["label"].replace(" ffn", "\nffn") for r in panel}
            impls = [i for i in dict.fromkeys(r["impl"] for r in panel) if not (bound_as_line and i == BOUND)]
            width = 0.8 / max(len(impls), 1)
            value = {(r["config"], r["impl"]): r[metric] for r in panel}
            for k, impl in enumerate(impls):
                xs = [c + (k - (len(impls) - 1) / 2) * width for c in range(len(configs))]
                ax.bar(xs, [value.get((cfg, impl), 0.0) for cfg in configs], width, label=impl,
                       color=COLORS.get(impl))
            if bound_as_line:
                for c, cfg in enumerate(configs):
                    if (cfg, BOUND) in value:
                        ax.hlines(value[cfg, BOUND], c - 0.45, c + 0.45, colors="black", linewidth=2,
                                  label="dense bound" if c == 0 else None)
            ax.set_xticks(range(len(configs)), [labels[c] for c in configs], fontsize=8)
            ax.set_ylabel(ylabel)
            ax.set_title(f"ep {ep}, {dtype}", fontsize=10)
            ax.legend(fontsize=8)
    tokens = records[0]["tokens"]
    fig.suptitle(f"{title} ({tokens} tokens/rank, hidden {records[0]['hidden']}, {records[0]['machine']['device']})")
    fig.tight_layout()
    return fig


def plot_records(records: list[dict], out_dir) -> list[pathlib.Path]:
    """Write the two figures into ``out_dir``; their paths."""
    if not records:
        raise ValueError("plot_records: no records to plot")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = records[0]["machine"]["device"]
    paths = []
    for name, metric, ylabel, line, title in (
            ("time", "step_ms", "forward+backward ms (median)", True, "MoE layer forward+backward, wall clock"),
            ("memory", "peak_mem_mb", "peak MiB above pre-forward", False, "MoE layer forward+backward peak memory")):
        fig = _figure(records, metric, ylabel, line, title)
        path = out / f"bench_layer_{device}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown_tables(records: list[dict]) -> str:
    """One markdown table per (ep, dtype): a row per configuration and implementation."""
    groups = {}
    for r in records:
        groups.setdefault((r["ep"], r["dtype"]), []).append(r)
    lines = []
    for (ep, dtype), rows in groups.items():
        loads = [r["load_avg_1m"] for r in rows]
        lines += [f"**ep {ep}, {dtype}** ({rows[0]['tokens']} tokens/rank; load average "
                  f"{min(loads):.1f}-{max(loads):.1f} when the cases started)", "",
                  "| config | impl | fwd ms | fwd+bwd ms | tokens/s | fwd / bound | fwd+bwd / bound | "
                  "CPU-time fwd / bound | CPU-time fwd+bwd / bound | peak MiB | dropped |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            dropped = "-" if r["dropped_frac"] is None else f"{100 * r['dropped_frac']:.1f}%"
            ratios = " | ".join("-" if r[k] is None else f"{r[k]:.2f}" for k in
                                ("fwd_bound_ratio", "bound_ratio", "fwd_cpu_bound_ratio", "cpu_bound_ratio"))
            lines.append(f"| {r['label']} | {r['impl']} | {r['fwd_ms']:.0f} | {r['step_ms']:.0f} | "
                         f"{r['tokens_per_s']:.0f} | {ratios} | {r['peak_mem_mb']:.0f} | {dropped} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", help="records written by bench_layer.py --json")
    p.add_argument("--out", default="docs/img", help="folder for the PNGs")
    p.add_argument("--markdown", action="store_true", help="print the markdown tables instead of plotting")
    args = p.parse_args()
    records = json.loads(pathlib.Path(args.json).read_text())
    if args.markdown:
        print(markdown_tables(records))
        return
    for path in plot_records(records, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

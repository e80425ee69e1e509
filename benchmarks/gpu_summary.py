"""Summarise a ``gpu_check.sh`` output folder: one table on stdout, ``summary.json`` beside the inputs.

    python benchmarks/gpu_summary.py runs/gpu

Reads ``steps.jsonl`` (exit status and seconds of each step), ``grouped_gemm.json``
(``bench_grouped_gemm.py``), ``layer.json`` (``bench_layer.py``), ``sync_free.json``
(``bench_sync_free.py``) and ``train_metrics.jsonl`` (``launch/train.py``); whatever is missing is
reported as missing. The grouped-GEMM rows
are checked against the aims of docs/performance.md: Triton >= 0.9x ``torch._grouped_mm``,
>= 3x the per-expert loop at 128 tokens per expert, >= 70 % of the dense rate at >= 1024,
and the fused FFN faster than the unfused one.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def grouped_gemm_rows(records: list[dict]) -> list[dict]:
    """One row per (model, proj, experts, tokens, mode) with the Triton ratios and the aims met."""
    cases = defaultdict(dict)
    for rec in records:
        key = (rec["model"], rec["proj"], rec["experts"], rec["tokens_per_expert"], rec["dist"], rec["mode"])
        cases[key][rec["method"]] = rec.get("tflops")
    rows = []
    for (model, proj, experts, tokens, dist, mode), rate in sorted(cases.items()):
        ours = rate.get("triton") or rate.get("triton_fused")

        def ratio(other):
            return ours / rate[other] if ours and rate.get(other) else None

        row = dict(model=model, proj=proj, experts=experts, tokens=tokens, dist=dist, mode=mode, tflops=ours,
                   vs_torch=ratio("torch_grouped_mm") or ratio("torch_unfused"), vs_loop=ratio("loop"),
                   vs_dense=ratio("dense"), vs_unfused=ratio("triton_unfused"))
        aims = []
        if row["vs_torch"] is not None:
            aims.append(row["vs_torch"] >= 0.9)
        if row["vs_loop"] is not None and tokens <= 128:
            aims.append(row["vs_loop"] >= 3.0)
        if row["vs_dense"] is not None and tokens >= 1024:
            aims.append(row["vs_dense"] >= 0.7)
        if row["vs_unfused"] is not None:
            aims.append(row["vs_unfused"] > 1.0)
        row["aims_met"] = all(aims) if aims else None
        rows.append(row)
    return rows


def layer_rows(records: list[dict]) -> list[dict]:
    """moe_ep against DeepSpeed and the dense bound per (config, ep, dtype)."""
    by_case = defaultdict(dict)
    for rec in records:
        by_case[(rec["config"], rec["ep"], rec["dtype"])][rec["impl"]] = rec
    rows = []
    for (config, ep, dtype), impls in sorted(by_case.items()):
        ours, ds = impls.get("moe_ep"), impls.get("deepspeed")
        if ours is None:
            continue
        rows.append(dict(config=config, ep=ep, dtype=dtype, step_ms=ours.get("step_ms"),
                         bound_ratio=ours.get("bound_ratio"), peak_mem_mb=ours.get("peak_mem_mb"),
                         deepspeed_step_over_ours=(ds["step_ms"] / ours["step_ms"]) if ds and ds.get("step_ms")
                         and ours.get("step_ms") else None,
                         deepspeed_mem_mb=ds.get("peak_mem_mb") if ds else None))
    return rows


def sync_free_rows(records: list[dict]) -> list[dict]:
    """The sync-free layer's step times per routing mode: eager, compiled, CUDA graph (None where not run)."""
    return [dict(mode=r["mode"], ep=r["ep"], dtype=r["dtype"], max_err=r["max_err"], graphs=r["graphs"],
                 eager_ms=r.get("eager_ms"), compiled_ms=r.get("compiled_ms"), cuda_graph_ms=r.get("cuda_graph_ms"))
            for r in records]


def _fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


# (key, header, format) of each printed column
GEMM_COLUMNS = [("model", "model", "8s"), ("proj", "proj", "5s"), ("experts", "E", "3d"), ("tokens", "tok/E", "6d"),
                ("mode", "mode", "7s"), ("tflops", "TFLOP/s", "8.1f"), ("vs_torch", "vs torch", "8.2f"),
                ("vs_loop", "vs loop", "8.2f"), ("vs_dense", "vs dense", "8.2f"), ("vs_unfused", "vs unfused", "10.2f"),
                ("aims_met", "aims", "")]
LAYER_COLUMNS = [("config", "layer", "8s"), ("ep", "ep", "2d"), ("dtype", "dtype", "5s"),
                 ("step_ms", "moe_ep ms", "10.2f"), ("bound_ratio", "/ bound", "8.2f"),
                 ("deepspeed_step_over_ours", "DeepSpeed/ours", "14.2f"), ("peak_mem_mb", "MiB ours", "9.0f"),
                 ("deepspeed_mem_mb", "MiB DeepSpeed", "13.0f")]
SYNC_FREE_COLUMNS = [("mode", "sync-free mode", "26s"), ("ep", "ep", "2d"), ("dtype", "dtype", "5s"),
                     ("max_err", "max err", "8.1e"), ("graphs", "graphs", "6d"), ("eager_ms", "eager ms", "9.2f"),
                     ("compiled_ms", "compiled ms", "11.2f"), ("cuda_graph_ms", "CUDA graph ms", "13.2f")]


def _print_table(rows, columns) -> None:
    if not rows:
        return
    widths = [max(len(header), int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0))
              for _, header, spec in columns]
    print("\n" + " ".join(f"{header:>{w}}" for (_, header, _), w in zip(columns, widths)))
    for row in rows:
        cells = (_fmt(row[key], spec) if spec else str(row[key]) for key, _, spec in columns)
        print(" ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))


def main(folder: str) -> dict:
    out = Path(folder)
    steps = _read_jsonl(out / "steps.jsonl")
    gemm = _read_json(out / "grouped_gemm.json")
    layer = _read_json(out / "layer.json")
    sync_free = _read_json(out / "sync_free.json")
    train = _read_jsonl(out / "train_metrics.jsonl")
    summary = dict(steps=steps,
                   grouped_gemm=grouped_gemm_rows(gemm["results"]) if gemm else None,
                   layer=layer_rows(layer) if layer else None,
                   sync_free=sync_free_rows(sync_free) if sync_free else None,
                   train=dict(first_val=next((r["val_loss"] for r in train if "val_loss" in r), None),
                              last_val=next((r["val_loss"] for r in reversed(train) if "val_loss" in r), None),
                              tokens_per_s=next((r["tokens_per_s"] for r in reversed(train) if "tokens_per_s" in r),
                                                None)) if train else None)
    print("step            exit  seconds")
    for s in steps:
        print(f"{s['step']:15s} {s['exit']:4d} {s['seconds']:8d}")
    _print_table(summary["grouped_gemm"], GEMM_COLUMNS)
    _print_table(summary["layer"], LAYER_COLUMNS)
    _print_table(summary["sync_free"], SYNC_FREE_COLUMNS)
    if summary["train"]:
        t = summary["train"]
        print(f"\ntrain: val loss {_fmt(t['first_val'], '.3f')} -> {_fmt(t['last_val'], '.3f')}, "
              f"{_fmt(t['tokens_per_s'], '.0f')} tokens/s")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu")

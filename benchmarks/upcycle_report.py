"""Upcycled MoE runs against the same MoE from scratch, from the run folders of benchmarks/upcycle_runs.sh.

    python benchmarks/upcycle_report.py runs/upcycle [--data-dir docs/data] [--img-dir docs/img]

Writes ``DATA_DIR/upcycle.json`` (the dense run and, per mode, the upcycled
and the from-scratch run: validation and training loss per step, parameters,
training and wall seconds, the load before the run, as
``distill_report.summarize``; for the upcycled run also its first validation
loss minus the dense checkpoint's last; for fine upcycling also the first
validation loss with the router rows drawn independently, without the tie
inside a copy that makes step 0 exact, on one process) and
``IMG_DIR/upcycle_val_loss.png``
(validation loss per step, training loss thin, the dense model's last
validation loss dashed), and prints a Markdown table. It checks that each
pair's ``run.json`` model configs are equal: the same MoE, only the start
differs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from matplotlib.figure import Figure

from distill_report import report_arguments, summarize
from moe_ep import ParallelState
from moe_ep.data import BatchSampler, load_corpus
from moe_ep.model_moe import moe_layers
from moe_ep.models import ModelConfig
from moe_ep.models.upcycle import ROUTER_STD, upcycle
from moe_ep.training.checkpoints import load_model
from moe_ep.training.driver import evaluate
from moe_ep.training.metrics import read_metrics
from moe_ep.training.model_source import dense_checkpoint
from moe_ep.training.plots import save_figure

MODES = {"coarse": "coarse: 8 copies of the FFN, top-2", "fine": "fine m = 4: 1 shared + 12 routed slices, top-3"}


def run_summary(folder: Path) -> dict:
    """``summarize`` plus the training loss per record and the model config of ``run.json``."""
    summary = summarize(folder)
    summary["train_curve"] = {r["step"]: r["loss"] for r in read_metrics(folder / "metrics.jsonl") if "loss" in r}
    summary["model"] = json.loads((folder / "run.json").read_text())["model"]
    return summary


def untied_first_loss(runs: Path, max_data_bytes: int = 8 << 20) -> float:
    """The first validation loss of ``upcycled_fine``'s model with independent ``N(0, ROUTER_STD^2)`` router rows.

    One process, the run's validation windows (its global batch on one rank; the corpus of the launcher's
    default ``--max-data-bytes``, checked against the run's fingerprint).
    """
    run = json.loads((runs / "upcycled_fine" / "run.json").read_text())
    model = upcycle(load_model(dense_checkpoint(str(runs / "dense"))[0]), ModelConfig.from_dict(run["model"]),
                    seed=run["train"]["seed"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.normal_(0.0, ROUTER_STD, generator=generator)
    corpus = load_corpus(None, max_bytes=max_data_bytes)
    if corpus.fingerprint != run["data"]["fingerprint"]:
        raise SystemExit("untied_first_loss: the corpus differs from the run's (another --max-data-bytes?)")
    train = run["train"]
    sampler = BatchSampler(corpus, train["batch_size"] * run["world_size"], train["seq_len"], train["seed"], 0, 1)
    return evaluate(model, sampler.val_batches(train["val_batches"]), ParallelState())


def main() -> None:
    args = report_arguments(__doc__, "benchmarks/upcycle_runs.sh")
    dense = run_summary(args.runs / "dense")
    result = dict(dense=dense, modes={})
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, len(MODES), sharey=True)
    print("| run | steps | val loss at step 0 | val loss at the end | parameters (total / activated) | training s | "
          "wall s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dense (tiny-dense) | {dense['steps']} | {dense['val_curve'][0]:.4f} | {dense['val_loss']:.4f} | "
          f"{dense['total_params'] / 1e6:.2f}M / {dense['activated_params'] / 1e6:.2f}M | "
          f"{dense['train_seconds']:.0f} | {dense['wall_seconds']} |")
    for ax, (mode, title) in zip(axes, MODES.items()):
        runs = {"upcycled": run_summary(args.runs / f"upcycled_{mode}"),
                "from scratch": run_summary(args.runs / f"scratch_{mode}")}
        if runs["upcycled"]["model"] != runs["from scratch"]["model"]:
            raise SystemExit(f"{mode}: the upcycled and the from-scratch run trained different models")
        runs["upcycled"]["first_val_minus_dense"] = runs["upcycled"]["val_curve"][0] - dense["val_loss"]
        result["modes"][mode] = dict(title=title, **runs)
        for name, s in runs.items():
            print(f"| {mode}, {name} | {s['steps']} | {s['val_curve'][0]:.4f} | {s['val_loss']:.4f} | "
                  f"{s['total_params'] / 1e6:.2f}M / {s['activated_params'] / 1e6:.2f}M | {s['train_seconds']:.0f} | "
                  f"{s['wall_seconds']} |")
            val, train = s["val_curve"], s["train_curve"]
            line, = ax.plot(sorted(val), [val[k] for k in sorted(val)], "o-", markersize=3,
                            label=f"{name}: {val[0]:.3f} -> {s['val_loss']:.3f}")
            ax.plot(sorted(train), [train[k] for k in sorted(train)], "-", color=line.get_color(), alpha=0.4,
                    linewidth=1)
        ax.axhline(dense["val_loss"], color="grey", linestyle="--",
                   label=f"dense checkpoint ({dense['steps']} steps): {dense['val_loss']:.3f}")
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step of the MoE run")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("cross-entropy (nats / byte)")
    fig.suptitle("validation loss (dots) and training loss (thin lines) of the MoE runs", fontsize=10)
    result["modes"]["fine"]["upcycled"]["first_val_untied_routers"] = untied_first_loss(args.runs)
    (args.data_dir / "upcycle.json").write_text(json.dumps(result, indent=2) + "\n")
    save_figure(fig, args.img_dir / "upcycle_val_loss.png")
    for mode, runs in result["modes"].items():
        print(f"{mode}: first validation loss of the upcycled run - the dense checkpoint's = "
              f"{runs['upcycled']['first_val_minus_dense']:.2e}")
    print(f"fine, router rows not tied within a copy: first validation loss "
          f"{result['modes']['fine']['upcycled']['first_val_untied_routers']:.4f}")


if __name__ == "__main__":
    main()

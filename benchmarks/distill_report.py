"""Distilled students against label-only students, from the run folders of benchmarks/distill_runs.sh.

    python benchmarks/distill_report.py runs/distill [--data-dir docs/data] [--img-dir docs/img]

For each case it writes ``DATA_DIR/distill_<case>.json`` (per run: final and
per-step validation loss, total and activated parameters of the global model,
training seconds, wall seconds, the load average before the run, the
distillation settings) and one figure ``IMG_DIR/distill_val_loss.png``
(validation loss per step, the teacher's final loss dashed), and prints a
Markdown table. Training seconds are the sum over records of (steps x world
tokens per step / tokens_per_s): the time in training steps, validation
excluded; wall seconds are the whole torchrun command's, start-up included.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

from moe_ep.model_moe import parameter_counts
from moe_ep.models import ModelConfig, MoETransformerLM
from moe_ep.training.metrics import read_metrics
from moe_ep.training.plots import save_figure

CASES = {
    "a": dict(title="(a) dense student (tiny-dense), MoE teacher (tiny)", teacher="teacher_moe",
              students={"labels only": "a_labels", "KD T=2": "a_kd", "KD T=1": "a_kd_T1",
                        "KD T=2 + hidden, attention, relation": "a_kd_features",
                        "labels only, seed 1": "a_labels_seed1",
                        "KD T=2 + hidden, attention, relation, seed 1": "a_kd_features_seed1"}),
    "b": dict(title="(b) MoE student (tiny), dense teacher (tiny-dense)", teacher="teacher_dense",
              students={"labels only": "b_labels", "KD T=2": "b_kd", "KD T=1": "b_kd_T1",
                        "KD T=2 + hidden, attention, relation": "b_kd_features"}),
}


def summarize(folder: Path) -> dict:
    """One run's numbers (see the module docstring)."""
    run = json.loads((folder / "run.json").read_text())
    records = read_metrics(folder / "metrics.jsonl")
    train = run["train"]
    tokens_per_step = train["batch_size"] * train["seq_len"] * run["world_size"]
    seconds, previous = 0.0, 0
    for record in records:
        if "tokens_per_s" in record:
            seconds += (record["step"] - previous) * tokens_per_step / record["tokens_per_s"]
        previous = record["step"]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    counts = parameter_counts(MoETransformerLM(ModelConfig.from_dict(run["model"])))
    summary = dict(run=folder.name, steps=train["steps"], val_loss=val[max(val)], val_curve=val,
                   total_params=counts.total, activated_params=counts.activated, train_seconds=round(seconds, 1),
                   wall_seconds=int((folder / "wall_seconds").read_text()),
                   loadavg_before=(folder / "loadavg_before").read_text().split())
    if "distill" in run:
        summary["distill"] = run["distill"]
        summary["teacher_val_loss"] = next(r["teacher_val_loss"] for r in records if "teacher_val_loss" in r)
    return summary


def report_arguments(description: str, runs_script: str) -> argparse.Namespace:
    """A report's command line: the folder of ``runs_script``'s runs, and where the JSON and PNG go (created)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help=f"folder holding the runs of {runs_script}")
    p.add_argument("--data-dir", type=Path, default=Path("docs/data"))
    p.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    args = p.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    args.img_dir.mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    args = report_arguments(__doc__, "benchmarks/distill_runs.sh")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, len(CASES), sharey=True)
    print("| case | run | val loss | parameters (total / activated) | training s | wall s |")
    print("|---|---|---|---|---|---|")
    for ax, (case, spec) in zip(axes, CASES.items()):
        teacher = summarize(args.runs / spec["teacher"])
        students = {name: summarize(args.runs / folder) for name, folder in spec["students"].items()}
        result = dict(case=spec["title"], teacher=teacher, students=students)
        (args.data_dir / f"distill_{case}.json").write_text(json.dumps(result, indent=2) + "\n")
        for name, s in [("teacher", teacher), *students.items()]:
            print(f"| {case} | {name} ({s['run']}, {s['steps']} steps) | {s['val_loss']:.3f} | "
                  f"{s['total_params'] / 1e6:.2f}M / {s['activated_params'] / 1e6:.2f}M | {s['train_seconds']:.0f} | "
                  f"{s['wall_seconds']} |")
        for name, s in students.items():
            steps = sorted(s["val_curve"])
            ax.plot(steps, [s["val_curve"][k] for k in steps], "o--" if "seed 1" in name else "o-", markersize=3,
                    label=f"{name}: {s['val_loss']:.3f}")
        ax.axhline(teacher["val_loss"], color="grey", linestyle="--",
                   label=f"teacher after {teacher['steps']} steps: {teacher['val_loss']:.3f}")
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
        ax.set_title(spec["title"], fontsize=10)
        ax.set_xlabel("student optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation cross-entropy (nats / byte)")
    save_figure(fig, args.img_dir / "distill_val_loss.png")


if __name__ == "__main__":
    main()

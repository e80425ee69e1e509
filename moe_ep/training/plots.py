"""PNG plots of a run's ``metrics.jsonl`` (matplotlib, Agg canvas, no pyplot state).

* ``loss.png``: training loss per record and validation loss per validation step; for a run with
  multi-token prediction also ``mtp_loss`` (lambda / D * sum_k CE_k) and each depth's ``mtp_<k>_loss``.
* ``expert_load.png``: one panel per MoE layer, experts (rows) x steps
  (columns), colour = the expert's load / mean load over the interval ending
  at that step (1 = balanced; blue under-, red over-loaded).
* ``loss_parts.png`` (only when the records hold other loss parts, e.g.
  distillation's): the label loss and every other ``*_loss`` part per record,
  log scale.
* ``eplb.png`` (only for ``--eplb-interval`` runs): at each re-placement of
  the experts, max/mean per-rank load of the loads it planned from under the
  placement before it and after it, mean over MoE layers and worst layer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .metrics import read_metrics


def save_figure(fig: Figure, path: Path) -> Path:
    """Render ``fig`` on an Agg canvas into the PNG ``path`` (110 dpi); return ``path``."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _finish_step_plot(fig: Figure, ax, ylabel: str, title: str, path: Path) -> Path:
    """Label a one-axes plot over optimizer steps (``ylabel``, ``title``, grid, legend) and save it to ``path``."""
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_losses(records: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train (mean over interval)", color="tab:blue", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", color="tab:orange")
    for name in mtp_losses(records):
        points = [(r["step"], r[name]) for r in records if name in r]
        ax.plot(*zip(*points), "--", label=name, alpha=0.8)
    return _finish_step_plot(fig, ax, "cross-entropy (nats / token)", "Loss", path)


def plot_expert_load(records: list[dict], path: Path) -> Path:
    rows = [r for r in records if r.get("expert_load")]
    n_layers = len(rows[0]["expert_load"]) if rows else 0
    fig = Figure(figsize=(8, 1.0 + 1.5 * max(n_layers, 1)), layout="constrained")
    if not n_layers:
        fig.add_subplot().text(0.5, 0.5, "no MoE load recorded", ha="center", va="center")
        return save_figure(fig, path)
    steps = [r["step"] for r in rows]
    edges = np.array([records[0]["step"]] + steps, dtype=float)
    load_LEC = np.array([r["expert_load"] for r in rows]).transpose(1, 2, 0)  # layer, expert, record
    ratio = load_LEC * load_LEC.shape[1]
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, float(ratio.max())))
    axes = fig.subplots(n_layers, 1, sharex=True, squeeze=False)[:, 0]
    for layer, ax in enumerate(axes):
        mesh = ax.pcolormesh(edges, np.arange(ratio.shape[1] + 1), ratio[layer], cmap="coolwarm", norm=norm)
        ax.set_ylabel(f"MoE layer {layer}\nexpert")
        ticks = np.arange(0, ratio.shape[1], max(1, ratio.shape[1] // 8))
        ax.set_yticks(ticks + 0.5, labels=[str(t) for t in ticks])
    axes[-1].set_xlabel("optimizer step")
    fig.colorbar(mesh, ax=list(axes), label="load / mean load")
    fig.suptitle("Routed load per expert")
    return save_figure(fig, path)


def mtp_losses(records: list[dict]) -> list[str]:
    """The multi-token prediction fields of the records: ``mtp_loss``, then ``mtp_<k>_loss`` by depth."""
    names = {k for r in records for k in r if k.startswith("mtp_") and k.endswith("_loss")}
    return sorted(names, key=lambda k: (k != "mtp_loss", len(k), k))


def loss_parts(records: list[dict]) -> list[str]:
    """The ``*_loss`` fields of the records beyond the training, auxiliary and validation losses."""
    return sorted({k for r in records for k in r if k.endswith("_loss") and "val" not in k and k != "aux_loss"})


def plot_loss_parts(records: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name in ["loss"] + loss_parts(records):
        points = [(r["step"], r[name]) for r in records if name in r]
        if points:
            ax.plot(*zip(*points), label="loss (labels)" if name == "loss" else name)
    ax.set_yscale("log")
    return _finish_step_plot(fig, ax, "loss (interval mean)", "Loss parts", path)


def plot_eplb(records: list[dict], path: Path) -> Path:
    events = [event for r in records for event in r.get("eplb", [])]
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    steps = [event["step"] for event in events]
    for key, label, color in (("before", "before re-plan", "tab:red"), ("after", "after re-plan", "tab:green")):
        ax.plot(steps, [np.mean(event[key]) for event in events], "o-", color=color,
                label=f"{label} (mean over layers)")
        ax.plot(steps, [np.max(event[key]) for event in events], "--", color=color, alpha=0.6,
                label=f"{label} (worst layer)")
    ax.axhline(1.0, color="grey", lw=0.8)
    return _finish_step_plot(fig, ax, "max / mean per-rank load",
                             "Expert placement (EPLB): load balance of each re-plan's window", path)


def plot_run(out_dir: Path) -> list[Path]:
    """Write the PNGs (module docstring) next to ``out_dir/metrics.jsonl``; return their paths."""
    out_dir = Path(out_dir)
    records = read_metrics(out_dir / "metrics.jsonl")
    paths = [plot_losses(records, out_dir / "loss.png"), plot_expert_load(records, out_dir / "expert_load.png")]
    if loss_parts(records):
        paths.append(plot_loss_parts(records, out_dir / "loss_parts.png"))
    if any(r.get("eplb") for r in records):
        paths.append(plot_eplb(records, out_dir / "eplb.png"))
    return paths

"""Time of one student step on labels alone against one distillation step, interleaved on one thread.

    python benchmarks/bench_distill_step.py runs/distill --out docs/data/distill_step_time.json

For each case of benchmarks/distill_report.py (teacher folder, student preset) and one process with one
thread (one torchrun rank of the runs), it alternates rounds of: a label-only step (student forward,
cross-entropy + aux loss, backward, AdamW), a KD step (``Distiller.train_step``, T = 2) and a KD step
with the hidden-state, attention and relation terms; the median seconds per step of each kind and the
ratios to the label-only step are printed and written as JSON. Interleaving shares the machine's load
between the kinds, which the wall times of separate runs on a shared machine do not.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_ep.distill import Distiller
from moe_ep.models import ModelConfig, MoETransformerLM
from moe_ep.training import TrainConfig
from moe_ep.training.optim import build_optimizer
from moe_ep.model_moe import total_aux_loss, update_moe_bias

CASES = {"a": ("teacher_moe", "tiny-dense"), "b": ("teacher_dense", "tiny")}
FEATURES = dict(hidden_loss_weight=1.0, attention_loss_weight=0.1, relation_loss_weight=1.0)


def label_step(model: MoETransformerLM, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) + total_aux_loss(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    update_moe_bias(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="folder holding teacher_moe/ and teacher_dense/")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps of each kind per round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len)
    batch = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    results = {}
    for case, (teacher, preset) in CASES.items():
        student = MoETransformerLM(ModelConfig.preset(preset))
        kinds = {"labels": partial(label_step, student, build_optimizer(student, cfg), batch)}
        for name, weights in (("kd", {}), ("kd_features", FEATURES)):
            distiller = Distiller(args.runs / teacher, MoETransformerLM(ModelConfig.preset(preset)),
                                  train_config=cfg, device="cpu", **weights)
            kinds[name] = partial(distiller.train_step, batch, 0)
        samples = {name: [] for name in kinds}
        for step in kinds.values():  # warm-up
            step()
        for _ in range(args.rounds):
            for name, step in kinds.items():
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step()
                    samples[name].append(time.perf_counter() - start)
        median = {name: statistics.median(values) for name, values in samples.items()}
        results[case] = dict(teacher=teacher, student=preset, seconds_per_step=median,
                             ratio_to_labels={name: median[name] / median["labels"] for name in median})
        print(f"{case}: {preset} from {teacher}: " + ", ".join(
            f"{name} {median[name] * 1e3:.0f} ms ({median[name] / median['labels']:.2f}x)" for name in median))
    if args.out:
        args.out.write_text(json.dumps(dict(batch_size=args.batch_size, seq_len=args.seq_len, threads=1,
                                            rounds=args.rounds, steps=args.steps, results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()

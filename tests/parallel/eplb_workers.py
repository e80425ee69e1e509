"""Workers of tests/parallel/test_eplb.py: training with redundant experts against training without them.

A case trains the same model (``checkpoint_workers.model_config``: 1 dense + 2 MoE blocks, 8 experts, width
32) from the same seed on the same batches in several runs on one layout: ``reference`` (one slot per
expert) and the runs of ``case["runs"]`` (``redundant_experts`` R, ``eplb_interval`` N). Per step it
compares every run's cross-entropy with the reference's; at the end the logical weights and AdamW moments
(the replicated runs moved to the logical layout) and that the replicas of each expert hold equal rows.
With ``case["traffic"]`` it checks the dispatcher's inter-node rows of every forward against the distinct
remote nodes of each token's experts under the layer's placement. With ``case["save"]`` each run writes
its checkpoint (``OUT/<run>``) and rank 0 the reference's unsharded state; ``load_runs`` loads those
checkpoints into models with or without replicas at other layouts and returns how far they are from it.
Results are plain numbers (tensors do not outlive a worker).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def _model_config(moe: dict, redundant: int):
    from ..checkpoint_workers import model_config

    base = model_config()
    return base.replace(moe=base.moe.replace(**moe, redundant_experts=redundant))


def _logical_state(model, optimizer, parallel) -> dict[str, torch.Tensor]:
    """Every model tensor and AdamW tensor, experts gathered in their logical layout (collective)."""
    from moe_ep.eplb.layout import logical_layout

    from ..checkpoint_workers import full_state

    with logical_layout(model, optimizer):
        return full_state(model, optimizer, parallel)


def _replica_spread(model) -> float:
    """Largest difference between two slots of one logical expert, over every layer and expert tensor."""
    from moe_ep.model_moe import moe_layers

    worst = 0.0
    for layer in moe_layers(model):
        if layer.placement is None:
            continue
        for p in layer.experts.parameters():
            rows = layer.parallel.all_gather_ep(p.detach())
            first = rows[layer.placement.slots_EC[layer.placement.phy2log_P, 0]]
            worst = max(worst, (rows - first).abs().max().item())
    return worst


def _expected_internode_rows(topk_idx_TK: torch.Tensor, phy2log_P: torch.Tensor, parallel) -> tuple[int, int]:
    """(sum, max) over this rank's tokens of the distinct nodes other than its own holding one of its experts,
    placed by ``phy2log_P``."""
    P = phy2log_P.numel()
    node_E = torch.empty(int(phy2log_P.max()) + 1, dtype=torch.long)
    node_E[phy2log_P] = torch.arange(P) // (P // parallel.nodes)  # all slots of an expert share a node
    hit_TN = torch.zeros(topk_idx_TK.shape[0], parallel.nodes, dtype=torch.bool)
    hit_TN.scatter_(1, node_E[topk_idx_TK], True)
    hit_TN[:, parallel.node_index] = False
    remote_T = hit_TN.sum(1)
    return int(remote_T.sum()), int(remote_T.max()) if remote_T.numel() else 0


def _train(moe: dict, redundant: int, interval: int, parallel, cfg, steps: int, traffic: bool) -> tuple:
    """(report, trainer, sampler) of ``steps`` plain-trainer steps of one run (module docstring)."""
    from moe_ep.model_moe import moe_layers
    from moe_ep.models import MoETransformerLM
    from moe_ep.training import PlainTrainer

    from ..deepspeed_workers import _sampler

    rank = dist.get_rank()
    sampler = _sampler(cfg, rank, dist.get_world_size())
    model = MoETransformerLM(_model_config(moe, redundant), parallel, seed=cfg.seed)
    trainer = PlainTrainer(model, parallel, cfg, eplb_interval=interval)
    layers = moe_layers(model)
    out = dict(losses=[], events=[], internode=[], expected=[], remote_max=0, lost_pairs=0, dropped=0)
    for step in range(steps):
        for layer in layers:
            layer.routing_record = []
        placed_before = [layer.phy2log().clone() for layer in layers]  # the placement this step's forward uses
        result = trainer.train_step(sampler.batch(step), step)
        out["losses"].append(result.ce.item())
        if result.eplb is not None:
            out["events"].append(result.eplb)
        for layer, stats, phy2log in zip(layers, result.stats[0], placed_before):
            counts = stats.as_dict()
            out["lost_pairs"] += counts["routed_pairs"] - counts["processed_pairs"] - counts["dropped_pairs"]
            out["dropped"] += counts["dropped_pairs"]
            if traffic:
                (topk_idx_TK,) = layer.routing_record
                total, worst = _expected_internode_rows(topk_idx_TK, phy2log, parallel)
                out["internode"].append(counts["internode_rows_sent"])
                out["expected"].append(total)
                out["remote_max"] = max(out["remote_max"], worst)
        for layer in layers:
            layer.routing_record = None
    out["state"] = _logical_state(model, trainer.optimizer, parallel)
    out["replica_spread"] = _replica_spread(model)
    out["slots"] = [layer.experts.num_local_experts for layer in layers]
    return out, trainer, sampler


def train_runs(rank: int, world: int, case: dict) -> dict:
    """Train the case's runs on its layout; compare each with the reference run (module docstring)."""
    import moe_ep
    from moe_ep.training import TrainConfig

    parallel = moe_ep.init_expert_parallel(ep_size=case["ep_size"], nodes=case.get("nodes"))
    steps = case.get("steps", 20)
    out_root = Path(case["out"])
    cfg = TrainConfig(steps=steps, batch_size=8 // world, seq_len=16, lr=1e-2, warmup_steps=2, log_every=1,
                      val_every=100, val_batches=1, out_dir=str(out_root))
    runs = {"reference": (0, 0), **{name: tuple(v) for name, v in case["runs"].items()}}
    report, states = {}, {}
    for name, (redundant, interval) in runs.items():
        result, trainer, sampler = _train(case["moe"], redundant, interval, parallel, cfg, steps,
                                          case.get("traffic", False))
        states[name] = result.pop("state")
        if case.get("save"):
            trainer.save(out_root / name, steps, sampler)
        report[name] = result
    ref = states["reference"]
    for name in runs:
        report[name]["loss_diff"] = max(abs(a - b) for a, b in zip(report[name]["losses"],
                                                                  report["reference"]["losses"]))
        report[name]["state_diff"] = max((states[name][k] - ref[k]).abs().max().item() for k in ref)
        report[name]["keys_equal"] = sorted(states[name]) == sorted(ref)
    if case.get("save") and rank == 0:
        torch.save(ref, out_root / "reference_state.pt")
    return report


def load_runs(rank: int, world: int, case: dict) -> dict:
    """Load each checkpoint ``run`` of ``case["into"]`` (written under ``case["load"]`` at another layout) into a
    model with ``redundant`` slots per EP group of ``ep_size`` ranks; the largest difference from the writer's
    reference state."""
    import moe_ep
    from moe_ep.model_moe import moe_layers
    from moe_ep.models import MoETransformerLM
    from moe_ep.training import TrainConfig
    from moe_ep.training.checkpoints import load_checkpoint
    from moe_ep.training.optim import build_optimizer

    from ..deepspeed_workers import _sampler

    root = Path(case["load"])
    dist.barrier()  # rank 0 has written the reference state
    reference = torch.load(root / "reference_state.pt", weights_only=True)
    cfg = TrainConfig(steps=20, batch_size=8 // world, seq_len=16, lr=1e-2, warmup_steps=2, log_every=1,
                      val_every=100, val_batches=1, out_dir=str(root / "loaded"))
    sampler = _sampler(cfg, rank, world)
    out = {}
    for run, ep_size, redundant in case["into"]:
        parallel = moe_ep.init_expert_parallel(ep_size=ep_size)
        model = MoETransformerLM(_model_config(case["moe"], redundant), parallel, seed=cfg.seed + 1)
        optimizer = build_optimizer(model, cfg)
        step = load_checkpoint(root / run / "ckpt" / "step_0020", model, optimizer, sampler, parallel, cfg)
        state = _logical_state(model, optimizer, parallel)
        out[f"{run} -> ep {ep_size}, R {redundant}"] = dict(
            step=step, placed=[layer.placement is not None for layer in moe_layers(model)],
            keys_equal=sorted(state) == sorted(reference),
            diff=max((state[k] - reference[k]).abs().max().item() for k in reference))
    return out


def train_then_load(rank: int, world: int, train_cases: list[dict], load_case: dict | None) -> dict:
    """``train_runs`` of each case and, when given, ``load_runs`` in one process group."""
    out = {"train": [train_runs(rank, world, case) for case in train_cases]}
    if load_case is not None:
        out["load"] = load_runs(rank, world, load_case)
    return out

"""Rank functions and helpers of tests/test_checkpoint.py (run in-process or by ``run_on_ranks``).

The model is the ``tiny`` preset shrunk to width 32 (1 dense + 2 MoE blocks,
8 experts, V3 bias on so the bias buffer is covered); the global batch is 8
sequences of 16 bytes at every layout. Results are plain Python values or
files: tensors do not outlive a worker.
"""
from __future__ import annotations

import contextlib
import pickle
import shutil
from pathlib import Path

import torch

GLOBAL_BATCH, SEQ, STEPS, RESUME_AT = 8, 16, 6, 3


def model_config():
    from moe_ep.models import ModelConfig

    base = ModelConfig.preset("tiny")
    moe = base.moe.replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, aux_free_bias=True,
                           bias_update_rate=1e-2)
    return base.replace(hidden_size=32, n_layers=3, n_heads=2, dense_intermediate_size=64, max_seq_len=SEQ, moe=moe)


def train_config(world: int, out_dir, steps: int = STEPS):
    from moe_ep.training import TrainConfig

    return TrainConfig(steps=steps, batch_size=GLOBAL_BATCH // world, seq_len=SEQ, lr=1e-2, warmup_steps=2,
                       log_every=1, val_every=100, val_batches=1, ckpt_every=RESUME_AT, out_dir=str(out_dir))


def parallel_for(world: int, ep_size: int):
    import moe_ep

    return moe_ep.init_expert_parallel(ep_size=ep_size) if world > 1 else moe_ep.ParallelState()


def setup(world: int, ep_size: int, out_dir, steps: int = STEPS):
    import torch.distributed as dist

    from moe_ep.models import MoETransformerLM

    from .deepspeed_workers import _sampler

    parallel = parallel_for(world, ep_size)
    cfg = train_config(world, out_dir, steps)
    rank = dist.get_rank() if parallel.distributed else 0
    sampler = _sampler(cfg, rank, world)
    return parallel, cfg, sampler, MoETransformerLM(model_config(), parallel, seed=cfg.seed)


@contextlib.contextmanager
def recording():
    """The names of the files this process hashes (``hashed``) and how often it parses a ``.metadata`` (``parses``)."""
    from moe_ep.checkpoint import integrity, storage

    seen = dict(hashed=[], parses=0)
    sha256_of, load = integrity.sha256_of, storage._MetadataUnpickler.load

    def hashing(path):
        seen["hashed"].append(Path(path).name)
        return sha256_of(path)

    def parsing(unpickler):
        seen["parses"] += 1
        return pickle.Unpickler.load(unpickler)

    integrity.sha256_of, storage._MetadataUnpickler.load = hashing, parsing
    try:
        yield seen
    finally:
        integrity.sha256_of, storage._MetadataUnpickler.load = sha256_of, load


def full_state(model, optimizer, parallel) -> dict[str, torch.Tensor]:
    """Unsharded copies of every model tensor and optimizer state tensor (experts gathered over EP)."""
    from moe_ep.gradients import partition_parameters

    experts = {id(p) for p in partition_parameters(model)[1]}
    names = {id(p): n for n, p in model.named_parameters()}
    expert_names = {names[i] for i in experts}
    out = {}
    for name, t in model.state_dict().items():
        out["model." + name] = (parallel.all_gather_ep(t) if name in expert_names else t).detach().clone()
    for p, state in optimizer.state.items():
        for field, value in state.items():
            full = parallel.all_gather_ep(value) if id(p) in experts and value.dim() else value
            out[f"optim.{names[id(p)]}.{field}"] = full.detach().clone()
    return out


def manual_steps(model, optimizer, sampler, parallel, cfg, steps: int) -> None:
    """``steps`` plain-trainer steps with ``optimizer`` at its current learning rate (no schedule)."""
    from moe_ep.training import PlainTrainer

    trainer = PlainTrainer(model, parallel, cfg)
    trainer.optimizer = optimizer
    for step in range(steps):
        trainer.update(sampler.batch(step), optimizer.param_groups[0]["lr"])


def write_reference(rank: int, world: int, ep_size: int, root: str) -> list[str]:
    """Save a checkpoint after 2 steps at (world, ep_size) and, on rank 0, the unsharded state it must hold.

    Returns the names of the files this rank hashed while saving.
    """
    from moe_ep.training.checkpoints import save_checkpoint
    from moe_ep.training.optim import build_optimizer

    parallel, cfg, sampler, model = setup(world, ep_size, Path(root) / "exact")
    optimizer = build_optimizer(model, cfg)
    manual_steps(model, optimizer, sampler, parallel, cfg, 2)
    with recording() as seen:
        save_checkpoint(Path(root) / "exact", 2, model, optimizer, sampler, parallel, cfg)
    reference = full_state(model, optimizer, parallel)
    if rank == 0:
        torch.save(reference, Path(root) / "exact_reference.pt")
    return sorted(seen["hashed"])


def load_and_compare(world: int, ep_size: int, root: str) -> dict:
    """Load the exact checkpoint at (world, ep_size); which tensors differ bitwise from the reference.

    Also which files this rank checksummed while loading, and how often it parsed ``.metadata``.
    """
    from moe_ep.training.checkpoints import load_checkpoint
    from moe_ep.training.optim import build_optimizer

    parallel, cfg, sampler, model = setup(world, ep_size, Path(root) / "exact-load")
    before = full_state(model, build_optimizer(model, cfg), parallel)
    optimizer = build_optimizer(model, cfg)
    with recording() as seen:
        step = load_checkpoint(Path(root) / "exact" / "ckpt" / "step_0002", model, optimizer, sampler, parallel, cfg)
    loaded = full_state(model, optimizer, parallel)
    reference = torch.load(Path(root) / "exact_reference.pt", weights_only=True)
    return dict(step=step, keys_equal=sorted(loaded) == sorted(reference),
                differ=sorted(k for k in reference if k in loaded and not torch.equal(loaded[k], reference[k])),
                unchanged_by_load=sorted(k for k in before if torch.equal(before[k], loaded[k])),
                checked=sorted(seen["hashed"]), parses=seen["parses"])


def damaged_load_error(rank: int, world: int, ep_size: int, root: str) -> dict:
    """Rank 0 copies the exact checkpoint and truncates the first file of the last rank's share; every rank loads it.

    Returns that file's name and the ``CheckpointError`` message this rank raised (None: none).
    """
    import torch.distributed as dist

    from moe_ep.checkpoint import CheckpointError, read_manifest
    from moe_ep.training.checkpoints import load_checkpoint
    from moe_ep.checkpoint.integrity import share
    from moe_ep.training.optim import build_optimizer

    source, folder = Path(root) / "exact" / "ckpt" / "step_0002", Path(root) / "damaged" / "step_0002"
    victim = share(read_manifest(source)["files"], world - 1, world)[0]
    if rank == 0:
        shutil.copytree(source, folder)
        (folder / victim).write_bytes((folder / victim).read_bytes()[:-1])
    dist.barrier()
    parallel, cfg, sampler, model = setup(world, ep_size, Path(root) / "damaged-load")
    try:
        load_checkpoint(folder, model, build_optimizer(model, cfg), sampler, parallel, cfg)
    except CheckpointError as exc:
        return dict(victim=victim, error=str(exc))
    return dict(victim=victim, error=None)


def train_run(world: int, ep_size: int, out_dir: str, resume_from: str | None) -> None:
    """The driver with a ``PlainTrainer`` at (world, ep_size), from scratch or resumed; metrics go to ``out_dir``."""
    from moe_ep.training import PlainTrainer, run

    parallel, cfg, sampler, model = setup(world, ep_size, out_dir)
    run(PlainTrainer(model, parallel, cfg), sampler, parallel, cfg, resume=Path(resume_from) if resume_from else None)


def source_then_resume(rank: int, world: int, root: str) -> dict:
    """At (4, ep 4): the exact checkpoint with its reference, the uninterrupted run; then resume at (4, dp 2 x ep 2).

    Then a damaged copy of the exact checkpoint is loaded at (4, dp 2 x ep 2) (``damaged_load_error``).
    """
    saved = write_reference(rank, world, world, root)
    train_run(world, world, str(Path(root) / "uninterrupted"), None)
    return dict(resume_layout(rank, world, 2, root), saved=saved, **damaged_load_error(rank, world, 2, root))


def resume_layout(rank: int, world: int, ep_size: int, root: str) -> dict:
    """At (world, ep_size): load the exact checkpoint and compare, then resume training from step RESUME_AT."""
    result = load_and_compare(world, ep_size, root)
    train_run(world, ep_size, str(Path(root) / f"resumed_w{world}_ep{ep_size}"),
              str(Path(root) / "uninterrupted" / "ckpt" / f"step_{RESUME_AT:04d}"))
    return result


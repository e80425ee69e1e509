"""Training through a DeepSpeed engine: its optimizer step, precision, clipping and checkpoints.

``DeepSpeedTrainer`` is the driver's trainer for launch/ds_train.py: the
model is built on DeepSpeed's expert groups and its MoE layers wrapped as
``deepspeed.moe.layer.MoE`` (``moe_ep.integrations.deepspeed``), then

    engine, *_ = deepspeed.initialize(model=model, config=grad_clip_plan(ds_config)[0],
                                      model_parameters=optimizer_param_groups(model, weight_decay))

and every step is ``deepspeed_step``: ``engine.backward`` / ``engine.step``
per micro-batch, then the MoE bias update (or, for a step the fp16 loss
scaler skipped, the MoE step discarded). Checkpoints are DeepSpeed's own
(``engine.save_checkpoint`` under ``OUT/ds_ckpt``, with the data position in
the client state); docs/deepspeed.md has the details.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from ..activation_checkpointing import enable_activation_checkpointing
from ..data import BatchSampler
from ..gradients import clip_gradients
from ..integrations.deepspeed import deepspeed_parallel_state, wrap_moe_layers
from ..model_moe import discard_moe_pending, update_moe_bias
from ..parallel.state import ParallelState
from .checkpoints import RestoredState, restore_training_state
from .cli import seq_len
from .config import TrainConfig
from .driver import RunResult, Trainer, run
from .model_source import build_model, default_seq_len, run_record
from .mtp import DEFAULT_MTP_WEIGHT
from .optim import decay_groups, lr_at, set_lr
from .runs import announce, describe, finish, rank_device, report, sampler_for, seed_training_noise
from .step import StepResult, forward_backward, language_model_loss, split_micro_batches

CKPT_DIR = "ds_ckpt"


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups for DeepSpeed's optimizer: the plain trainer's decay rule, split for MoE.

    ``optim.decay_groups`` (weight decay on tensors of 2+ dims), then
    ``split_params_into_different_moe_groups_for_optimizer`` moves the expert
    parameters (marked) to groups named ``ep_size_<ep>`` with ``moe=True``,
    which ZeRO partitions over the expert-data-parallel group. Call after
    ``wrap_moe_layers``.
    """
    return [g for g in split_params_into_different_moe_groups_for_optimizer(decay_groups(model, weight_decay))
            if g["params"]]


def deepspeed_precision(ds_config: dict) -> str:
    """``fp32``, ``bf16`` or ``fp16``: the config's enabled mixed-precision section (raises if both are)."""
    enabled = [name for name in ("bf16", "fp16") if ds_config.get(name, {}).get("enabled", False)]
    if len(enabled) > 1:
        raise ValueError("DeepSpeed config: bf16 and fp16 are both enabled; enable one")
    return enabled[0] if enabled else "fp32"


def undo_initial_optimizer_step(engine) -> bool:
    """Undo the zero-gradient step DeepSpeed's ``FP16_UnfusedOptimizer`` takes at construction; True if it did.

    DeepSpeed wraps a torch optimizer in ``FP16_UnfusedOptimizer`` for bf16
    at ZeRO stage 0, and its ``initialize_optimizer_states`` runs one
    ``step()`` with zero gradients: AdamW's step counter starts at 1 (every
    later bias correction is one step late) and decoupled weight decay
    shrinks the fp32 masters once by ``lr * weight_decay`` (docs/deepspeed.md
    has the version and the upstream report). This clears the optimizer state (AdamW
    re-creates it at its next step, at step 0) and copies the masters back
    from the bf16 weights, which that step did not touch (the masters were
    copied from them). Call it once, right after ``deepspeed.initialize``.
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return False
    optimizer.optimizer.state.clear()
    with torch.no_grad():
        for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for low, high in zip(lows, highs):
                high.copy_(low)
    return True


def grad_clip_plan(ds_config: dict) -> tuple[dict, Optional[float]]:
    """(config for ``deepspeed.initialize``, max norm to clip with ``clip_gradients`` ourselves, or None).

    ZeRO 1/2 compute the global norm of an MoE model correctly (expert
    shards' squares are summed over the data-parallel group), so their
    ``gradient_clipping`` is kept. Without ZeRO (stage 0) DeepSpeed averages
    the per-rank norms, which is not the global norm once experts are
    sharded; there the returned config has clipping off and ``deepspeed_step``
    clips with ``moe_ep.gradients.clip_gradients`` after the reduction
    (bf16 gradients under ``bf16``, which has no loss scale). ``fp16`` at
    stage 0 raises ``ValueError``: the gradients there carry the loss scale.
    """
    config = copy.deepcopy(ds_config)
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage == 0 and deepspeed_precision(config) == "fp16":
        raise ValueError("DeepSpeed config: fp16 needs ZeRO stage 1 or 2 with moe_ep: at stage 0 the parameters' "
                         "gradients are loss-scaled where deepspeed_step measures and clips the global norm")
    clip = float(config.get("gradient_clipping", 0.0) or 0.0)
    if stage == 0 and clip > 0:
        config["gradient_clipping"] = 0.0
        return config, clip
    return config, None


def deepspeed_step(engine, model: nn.Module, batch: torch.Tensor, lr: float, parallel: ParallelState,
                   manual_clip: Optional[float], mtp_weight: float = DEFAULT_MTP_WEIGHT) -> StepResult:
    """One optimizer step through the engine, as the plain trainer's (``moe_ep.training.plain``).

    ``batch`` is split into the engine's ``gradient_accumulation_steps``
    micro-batches; each: ``loss = CE [+ L_MTP] + aux`` (``mtp_weight``: lambda of
    a model with MTP modules) -> ``engine.backward`` (which
    divides by their number; the gradient reduction happens at the last),
    ``engine.step()`` between micro-batches (no update there). Then clipping
    (``manual_clip`` from ``grad_clip_plan``, else DeepSpeed's) ->
    ``engine.step()`` -> the MoE layers close the step: ``update_moe_bias``
    when the engine applied it, ``discard_moe_pending`` when it skipped it
    (fp16 overflow: ``engine.was_step_applied()`` is False). ``grad_norm`` is
    the global norm before clipping (our measurement at stage 0, DeepSpeed's
    with ZeRO, NaN when DeepSpeed computed none).
    """
    set_lr(engine.optimizer, lr)
    micro_batches = split_micro_batches(batch, engine.gradient_accumulation_steps())

    def backward(loss: torch.Tensor, last: bool) -> None:
        engine.backward(loss)
        if not last:
            engine.step()  # counts the micro-step; the update happens at the boundary

    result = forward_backward(model, micro_batches, language_model_loss(engine, model, mtp_weight), backward)
    norm = None
    if engine.zero_optimization_stage() == 0:
        norm = clip_gradients(model, parallel, manual_clip)  # measures only when manual_clip is None
    engine.step()
    if norm is None:
        ds_norm = engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if ds_norm is None else float(ds_norm))
    result.grad_norm = norm.detach().float()
    result.applied = engine.was_step_applied()
    result.lr = lr
    if result.applied:
        update_moe_bias(model)
    else:
        discard_moe_pending(model)
    return result


class DeepSpeedTrainer(Trainer):
    """Steps and checkpoints through ``engine`` (``model``: the module it wraps, where the MoE layers are).

    ``manual_clip``: from ``grad_clip_plan``; ``client_state``: stored with
    every checkpoint besides the data position (the launcher's run record);
    ``restored``: a moe_ep checkpoint the model was initialised from
    (``--init-from``), whose step the run starts at and whose AdamW moments
    are installed when the engine runs torch's AdamW (ZeRO 0). ``mtp_weight``:
    lambda of the MTP loss of a model with MTP modules (``--mtp-weight``).
    """

    def __init__(self, engine, model: nn.Module, parallel: ParallelState, cfg: TrainConfig,
                 manual_clip: Optional[float], client_state: dict, restored: Optional[RestoredState] = None,
                 mtp_weight: float = DEFAULT_MTP_WEIGHT):
        self.engine, self.model, self.parallel, self.cfg = engine, model, parallel, cfg
        self.manual_clip, self.client_state, self.mtp_weight = manual_clip, client_state, mtp_weight
        self.precision = "fp32"  # the engine holds the weights in its precision; validation runs as they are
        if restored is not None:
            self.start_step = restored.step
            if isinstance(engine.optimizer, torch.optim.AdamW):
                restored.load_optimizer(engine.optimizer)

    def train_step(self, batch_BS: torch.Tensor, step: int) -> StepResult:
        return deepspeed_step(self.engine, self.model, batch_BS, lr_at(step, self.cfg), self.parallel,
                              self.manual_clip, self.mtp_weight)

    def save(self, out_dir: Path, step: int, sampler: BatchSampler) -> Path:
        folder = Path(out_dir) / CKPT_DIR
        self.engine.save_checkpoint(str(folder), tag=f"step_{step:04d}",
                                    client_state=dict(self.client_state, data=sampler.state_dict(step),
                                                      train_config=self.cfg.to_dict()))
        return folder / f"step_{step:04d}"

    def load(self, folder: Path, sampler: BatchSampler) -> int:
        """Continue from DeepSpeed's latest checkpoint under ``folder`` (trusted input: DeepSpeed unpickles it)."""
        load_path, client_state = self.engine.load_checkpoint(str(folder))
        if load_path is None:
            raise ValueError(f"--resume: no DeepSpeed checkpoint under {folder}")
        # the data position is saved by rank 0 (layout-free); every rank checks it against its own sampler
        return sampler.check_resume(client_state["data"])


def read_ds_config(path: str) -> dict:
    """The DeepSpeed config file as a dict; ``ValueError`` / ``OSError`` when it does not read as a JSON object."""
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def config_fields(ds_config: dict, path: str) -> dict:
    """The ``TrainConfig`` fields the DeepSpeed config sets: batch per rank and step, micro-batches, AdamW settings,
    clipping; ``ValueError`` naming ``path`` when it lacks them or they are not numbers."""
    defaults = TrainConfig()
    optimizer = ds_config.get("optimizer", {})
    if optimizer.get("type", "").lower() not in ("adamw", "adam"):
        raise ValueError(f"{path}: optimizer.type must be AdamW (the plain trainer's optimizer)")
    params = optimizer.get("params", {})
    if "train_micro_batch_size_per_gpu" not in ds_config:
        raise ValueError(f"{path}: set train_micro_batch_size_per_gpu (sequences per rank)")
    try:
        accum = int(ds_config.get("gradient_accumulation_steps", 1))
        beta1, beta2 = (float(b) for b in params.get("betas", (defaults.beta1, defaults.beta2)))
        # TrainConfig's batch_size is per rank per optimizer step: the micro-batches of one step
        return dict(batch_size=int(ds_config["train_micro_batch_size_per_gpu"]) * accum, grad_accum=accum,
                    lr=float(params.get("lr", defaults.lr)), weight_decay=float(params.get("weight_decay", 0.0)),
                    beta1=beta1, beta2=beta2, grad_clip=float(ds_config.get("gradient_clipping", 0.0) or 0.0) or None)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def train_config(args: argparse.Namespace, ds_fields: dict) -> TrainConfig:
    """launch/ds_train.py's ``TrainConfig``: the schedule and run flags, and ``ds_fields`` (``config_fields``)."""
    return TrainConfig(steps=args.steps, activation_checkpointing=args.activation_checkpointing,
                       seq_len=seq_len(args, default_seq_len(args)), min_lr_ratio=args.min_lr_ratio,
                       warmup_steps=args.warmup, log_every=args.log_every, val_every=args.val_every,
                       ckpt_every=args.ckpt_every, val_batches=args.val_batches, seed=args.seed, out_dir=args.out,
                       **ds_fields)


def deepspeed_run(args: argparse.Namespace) -> RunResult:
    """launch/ds_train.py after its flags were parsed and checked (``moe_ep.training.runs`` for the pieces)."""
    import deepspeed

    prefix = "[moe_ep/deepspeed]"
    ds_config = read_ds_config(args.deepspeed_config)
    engine_config, manual_clip = grad_clip_plan(ds_config)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    precision = deepspeed_precision(ds_config)
    parallel = deepspeed_parallel_state(args.ep_size, nodes=args.nodes)
    device = rank_device()
    cfg = train_config(args, config_fields(ds_config, args.deepspeed_config))
    out = Path(cfg.out_dir)

    seed_training_noise(cfg, parallel)
    source = build_model(args, parallel, device, seed=cfg.seed)
    model = source.model
    sampler = sampler_for(source.corpus, cfg, parallel)
    restored = restore_training_state(Path(args.init_from), model, sampler, parallel, cfg) if args.init_from \
        else None
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    wrap_moe_layers(model, args.ep_size)
    engine, _, _, _ = deepspeed.initialize(model=model, config=engine_config,
                                           model_parameters=optimizer_param_groups(model, cfg.weight_decay))
    undo_initial_optimizer_step(engine)  # bf16 at ZeRO 0: DeepSpeed's wrapper took an AdamW step at construction
    trainer = DeepSpeedTrainer(engine, model, parallel, cfg, manual_clip, dict(model_config=source.info), restored,
                               args.mtp_weight)
    if restored is not None and not isinstance(engine.optimizer, torch.optim.AdamW) and parallel.is_rank0:
        print(f"{prefix} --init-from: {type(engine.optimizer).__name__} keeps AdamW state in its own partitions; "
              f"the moments restart from zero (weights, step and data position are restored)", flush=True)
    resume = out / CKPT_DIR if args.resume else None
    run_info = run_record(source.info, cfg, parallel, device, source.corpus,
                          deepspeed=dict(version=deepspeed.__version__, zero_stage=stage, precision=precision,
                                         config=ds_config,
                                         clipping="moe_ep.clip_gradients" if manual_clip else "deepspeed"),
                          resumed=bool(args.resume), init_from=args.init_from)
    announce(parallel, out, run_info,
             describe(f"{prefix} {args.hf_model or args.preset}", model, parallel, device, source.corpus,
                      f", ZeRO stage {stage}, {precision}, {cfg.grad_accum} micro-batch(es) per step"))
    result = run(trainer, sampler, parallel, cfg, resume=resume, tensorboard=args.tensorboard)
    report(parallel, result, out, prefix)
    finish(parallel, source, args.save_hf, prefix)
    return result

"""``PipelineTrainer``: the optimizer step over ``pp_size`` pipeline stages, on ``torch.distributed.pipelining``.

The model (an ``MoETransformerLM`` of a ``ModelConfig``, or a transformers DeepSeek model made
expert-parallel) is cut into stages (``moe_ep.models.pipeline``, ``moe_ep.models.hf_pipeline``): one per
rank for ``gpipe`` and ``1f1b``, two per rank for ``interleaved-1f1b`` (looped: rank r holds stages r and
r + P) and for the V schedules ``zbv`` and ``dualpipev`` (rank r holds stages r and 2P - 1 - r). torch's schedule classes run the micro-batches;
``--grad-accum M`` micro-batches at pp 1 are the pipeline's M micro-batches, so a run at ``pp_size P`` takes
the step a run at pp 1 takes. One step on every rank:

    the schedule: forward and backward of the M micro-batches on this rank's stages (stage 0 reads
                  batch[:, :-1], the last stage computes CE against batch[:, 1:]; autocast inside each
                  stage's forward under bf16)
    every MoE layer's aux loss enters the backward where the layer sits (``_AuxCarrier``: its output
                  carries the aux loss, whose gradient 1 it returns), as at pp 1 where the loss adds it
    gradients / M (the schedule sums the micro-batches' gradients; ``scale_grads=False``)
    tied embeddings or MTP: the first stage's and the last stage's embedding copies sum their gradients over
                  ``pp_group``
    sync_gradients over the stage's (dp, ep) ranks; clip_gradients with the norm over every stage
    AdamW at lr_at(s); update_moe_bias of this rank's MoE layers

MTP (``mtp_depth`` > 0, ``moe_ep.models.mtp``): the modules live on the last stage, whose schedule output is
then its last block's output; the loss function runs the head and the MTP modules on it (CE + L_MTP in
training, CE in validation; ``moe_ep.training.mtp``), so the MTP blocks' MoE layers run on the last stage.
Under zbv and dualpipev the last stage then runs its whole backward at the input-gradient action and nothing at
the weight action (``_full_backward``): torch's split backward computes the weight gradients of each parameter
group from saved intermediate gradients, and with MTP the embedding's group (its use at depth k > 1, or as the
tied head) reaches back through an earlier depth's block, whose graph another group's weight pass has freed.
The other stages keep the split.

With ``overlap_fb`` (dualpipev), each of DualPipeV's paired forward and backward runs interleaved at the MoE
all-to-alls (``moe_ep.training.pipeline_overlap``). docs/pipeline.md has the layouts, flags and checks.

The step's result is the same on every rank: the last stage's mean CE and the summed aux loss of every
stage go round ``pp_group``, and so do the MoE statistics of every layer (in depth order), so the metrics
and plots cover the whole model. Checkpoints are the plain trainer's (``moe_ep.training.checkpoints``): each
rank writes and reads its stages' tensors under the full model's names, so a checkpoint written at one
(pp, dp, ep) layout resumes at any other.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                          ScheduleInterleaved1F1B, ScheduleZBVZeroBubble)
from torch.distributed.pipelining._utils import generate_rank_to_stage_mapping
from torch.distributed.pipelining.schedules import OVERLAP_F_B

from ..activation_checkpointing import enable_activation_checkpointing
from ..data import BatchSampler
from ..gradients import clip_gradients, sync_gradients
from ..layer import MoELayer
from ..model_moe import moe_layers, update_moe_bias
from ..models import ModelConfig
from ..models.hf_pipeline import hf_rank_stages
from ..models.pipeline import lm_rank_stages, split_blocks
from ..parallel.state import ParallelState
from .checkpoints import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .driver import Trainer
from .mtp import DEFAULT_MTP_WEIGHT, add_mtp
from .optim import build_optimizer, lr_at, set_lr
from .pipeline_overlap import overlapped_forward_backward
from .step import StepResult, cross_entropy, precision_autocast

# schedule name -> (torch class, stage placement, stages per rank)
SCHEDULES = {"gpipe": (ScheduleGPipe, "loop", 1), "1f1b": (Schedule1F1B, "loop", 1),
             "interleaved-1f1b": (ScheduleInterleaved1F1B, "loop", 2), "zbv": (ScheduleZBVZeroBubble, "v", 2),
             "dualpipev": (ScheduleDualPipeV, "v", 2)}


class _AuxCarrier(torch.autograd.Function):
    """``y`` unchanged; in backward, gradient 1 for ``aux`` (the aux loss enters the loss where its layer sits)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape = aux.shape
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        aux_grad = torch.ones(ctx.aux_shape, dtype=torch.float32, device=dy.device) if ctx.needs_input_grad[1] \
            else None
        return dy, aux_grad


class _Stage(PipelineStage):
    """torch's ``PipelineStage``, except that a forward-only pass (``schedule.eval``) of a V schedule passes no
    gradient at the bend between the two stages of one rank: torch 2.13's runtime still asks for it there and the
    stage raises ("can't steal_bwd_input if this stage doesn't have backward")."""

    def get_local_bwd_output(self, mb_index: int):
        return super().get_local_bwd_output(mb_index) if self.has_backward else None

    def set_local_bwd_input(self, next_stage_bwd_outputs, mb_index: int) -> None:
        if self.has_backward:
            super().set_local_bwd_input(next_stage_bwd_outputs, mb_index)


class _BlocksOnly(nn.Module):
    """A last stage of a model with MTP, up to its last block's output (the loss runs the head and the MTP
    modules: ``PipelineTrainer._mtp_loss``)."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage.run_blocks(x)[0]


class _Autocast(nn.Module):
    """A stage's forward under the training precision's autocast (the backward runs outside it)."""

    def __init__(self, stage: nn.Module, precision: str):
        super().__init__()
        self.stage, self.precision = stage, precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with precision_autocast(self.precision, x.device):
            return self.stage(x)


def schedule_problem(schedule: str, pp_size: int, n_micro: int, overlap_fb: bool = False) -> Optional[str]:
    """Why ``schedule`` cannot run ``n_micro`` micro-batches over ``pp_size`` ranks (torch 2.13's requirements), or
    None: 1f1b needs at least one per stage, interleaved-1f1b a multiple of its rounds (max(1, M // P)),
    dualpipev at least one per stage (2P); ``overlap_fb`` only exists for dualpipev."""
    if schedule not in SCHEDULES:
        return f"unknown pipeline schedule {schedule!r}; choose from {sorted(SCHEDULES)}"
    if overlap_fb and schedule != "dualpipev":
        return f"only the dualpipev schedule overlaps a forward with a backward, not {schedule}"
    n_stages = pp_size * SCHEDULES[schedule][2]
    rounds = max(1, n_micro // pp_size)
    if schedule in ("1f1b", "dualpipev") and n_micro < n_stages:
        return (f"{schedule} over {n_stages} stages needs at least {n_stages} micro-batches per step "
                f"(--grad-accum), got {n_micro}")
    if schedule == "interleaved-1f1b" and n_micro % rounds:
        return (f"interleaved-1f1b at pp {pp_size} needs a micro-batch count (--grad-accum) that is a multiple of "
                f"its rounds max(1, M // {pp_size}) = {rounds}, got {n_micro}")
    return None


def _full_backward():
    """torch's ``dw_builder`` of a stage whose backward is not split: the input-gradient action runs the whole
    backward (weights included), and the weight action runs this builder's runner, which has nothing left to do."""
    return lambda: None


def _block_index(path: str) -> int:
    """The transformer block of an MoE layer from its module path (``layers.<i>.`` in it)."""
    found = re.search(r"(?:^|\.)(?:layers|mtp)\.(\d+)\.", path + ".")
    if found is None:
        raise ValueError(f"MoE layer {path!r} is not inside a block named layers.<i> or mtp.<i>")
    return int(found.group(1))


def stage_indices(schedule: str, pp_size: int, pp_rank: int) -> tuple[int, list[int]]:
    """(stages in all, the stages this rank holds) for ``schedule`` (module docstring)."""
    _, style, per_rank = SCHEDULES[schedule]
    n_stages = pp_size * per_rank
    return n_stages, generate_rank_to_stage_mapping(pp_size, n_stages, style)[pp_rank]


class PipelineTrainer(Trainer):
    """The pipelined optimizer step (module docstring) of a model on ``parallel`` (``pp_size`` stages).

    ``model``: a ``ModelConfig`` (each stage of its ``MoETransformerLM`` built with ``seed`` as the whole model
    would be; ``initial_state``, the whole model's ``state_dict``, e.g. an upcycled model's, replaces the seeded
    values), or a transformers DeepSeek causal LM made expert-parallel (``moe_ep.hf_model``), which is pruned
    to this rank's stages (``moe_ep.models.hf_pipeline``). ``layer_counts``: blocks per stage (default:
    balanced). ``overlap_fb`` (``dualpipev`` only): each overlapped pair of a forward and a backward runs
    interleaved at the MoE all-to-alls (``moe_ep.training.pipeline_overlap``), else one after the other.
    ``mtp_weight``: lambda of the MTP loss when the model has MTP modules (``moe_ep.training.mtp``).
    """

    def __init__(self, model: ModelConfig | nn.Module, parallel: ParallelState, cfg: TrainConfig,
                 device: torch.device, seed: int = 0, schedule: str = "1f1b",
                 layer_counts: Optional[Sequence[int]] = None, overlap_fb: bool = False,
                 initial_state: Optional[dict] = None, mtp_weight: float = DEFAULT_MTP_WEIGHT):
        mtp_depth = model.mtp_depth if isinstance(model, ModelConfig) else 0
        problem = schedule_problem(schedule, parallel.pp_size, cfg.grad_accum, overlap_fb)
        if problem:
            raise ValueError(problem)
        self.parallel, self.cfg, self.precision = parallel, cfg, cfg.precision
        self.mtp_depth, self.mtp_weight = mtp_depth, mtp_weight
        self._mtp_parts: list[dict] = []  # the last stage's CE and MTP parts of each training micro-batch
        cls, style, per_rank = SCHEDULES[schedule]
        n_stages, local = stage_indices(schedule, parallel.pp_size, parallel.pp_rank)
        if isinstance(model, ModelConfig):
            blocks = split_blocks(model.n_layers, n_stages, layer_counts)
            self.rank_stages = lm_rank_stages(model, parallel, seed, local, blocks)
            if initial_state is not None:
                module = self.rank_stages.module
                module.load_state_dict({name: initial_state[name] for name in module.state_dict()})
        else:
            blocks = split_blocks(model.config.num_hidden_layers, n_stages, layer_counts)
            self.rank_stages = hf_rank_stages(model, local, blocks)
        self.model = self.rank_stages.module.to(device)
        self.n_stages, self.n_micro = n_stages, cfg.grad_accum
        stage_rank = {s: r for r, stages in generate_rank_to_stage_mapping(parallel.pp_size, n_stages,
                                                                           style).items() for s in stages}
        first_and_last_apart = stage_rank[0] != stage_rank[n_stages - 1]
        self.tied_across_ranks = first_and_last_apart and self._any_stage_holds_tied()
        stages = self.rank_stages.stages
        if cfg.activation_checkpointing:
            own_switch = [stage for stage in stages.values() if hasattr(stage, "activation_checkpointing")]
            for target in own_switch or [self.model]:
                enable_activation_checkpointing(target)
        self._records: list = []  # (depth, aux, stats) of every forward of the step, not the recomputations
        self.depth, self.n_moe_layers, self.n_experts = self._moe_depths()
        for layer in moe_layers(self.model):
            layer.register_forward_hook(self._carry_aux)
        mtp_stage = n_stages - 1 if self.mtp_depth else None
        runs = {i: _BlocksOnly(stage) if i == mtp_stage else stage for i, stage in stages.items()}
        self.pipeline_stages = [_Stage(_Autocast(runs[i], cfg.precision), i, n_stages, device,
                                       *self._stage_io(cfg, i), group=parallel.pp_group,
                                       dw_builder=_full_backward if i == mtp_stage else None) for i in sorted(stages)]
        loss_fn = self._mtp_loss if self.mtp_depth else cross_entropy
        kwargs = dict(n_microbatches=self.n_micro, loss_fn=loss_fn, scale_grads=False)
        self.schedule = cls(self.pipeline_stages[0] if per_rank == 1 else self.pipeline_stages, **kwargs)
        if overlap_fb:
            self.schedule.register_custom_function(OVERLAP_F_B, overlapped_forward_backward)
        self.optimizer = build_optimizer(self.model, cfg)

    def _any_stage_holds_tied(self) -> bool:
        """Whether the model ties its embeddings (some rank of ``pp_group`` holds a tied embedding)."""
        return any(self._over_stages(self.rank_stages.tied is not None))

    def _moe_depths(self) -> tuple[dict[MoELayer, int], int, int]:
        """({each of this rank's MoE layers: its position among the whole model's MoE layers}, the model's MoE
        layers, routed experts per layer): the block index of every stage's MoE layers (from their module paths,
        ``...layers.<i>...``), gathered over ``pp_group``."""
        mine = [(_block_index(path), module) for path, module in self.model.named_modules()
                if isinstance(module, MoELayer)]
        gathered = self._over_stages([(index, layer.config.n_routed_experts) for index, layer in mine])
        every = sorted({item for part in gathered for item in part})
        position = {index: depth for depth, (index, _) in enumerate(every)}
        return {layer: position[index] for index, layer in mine}, len(every), (every[0][1] if every else 0)

    def _stage_io(self, cfg: TrainConfig, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Example input and output of stage ``index`` for one micro-batch (meta tensors: shapes and dtypes), so
        the stages know their messages without a forward of their own (which would be an extra MoE forward)."""
        micro, hidden_size = cfg.batch_size // cfg.grad_accum, self.rank_stages.hidden_size
        hidden = dict(size=(micro, cfg.seq_len, hidden_size), device="meta")
        inputs = torch.empty(micro, cfg.seq_len, dtype=torch.long, device="meta") if index == 0 \
            else torch.empty(**hidden, requires_grad=True)
        if index < self.n_stages - 1 or self.mtp_depth:  # with MTP the last stage outputs hidden states too
            return inputs, torch.empty(**hidden, requires_grad=True)
        logits_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32  # the head runs under autocast
        return inputs, torch.empty(micro, cfg.seq_len, self.rank_stages.vocab_size, dtype=logits_dtype,
                                   device="meta", requires_grad=True)

    @property
    def holds_first(self) -> bool:
        return 0 in self.rank_stages.stages

    @property
    def holds_last(self) -> bool:
        return self.n_stages - 1 in self.rank_stages.stages

    def _carry_aux(self, layer: MoELayer, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of every MoE layer: record its aux loss and statistics, carry the aux loss backward."""
        if layer._replaying:  # an activation-checkpointing recomputation: its first forward carried it
            return output
        self._records.append((self.depth[layer], layer.aux_loss.detach(), layer.last_stats))
        return _AuxCarrier.apply(output, layer.aux_loss) if layer.aux_loss.requires_grad else output

    def _mtp_loss(self, h_BSH: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """The last stage's loss with MTP, from its last block's output: CE + L_MTP in training (its parts kept
        for the step's result), the CE alone in validation."""
        stage = self.rank_stages.stages[self.n_stages - 1]
        with precision_autocast(self.precision, h_BSH.device):
            ce = cross_entropy(stage.logits(h_BSH), labels_BS)
            if not self.model.training:  # validation (evaluate)
                return ce
            loss, parts = add_mtp(ce, stage.mtp_logits(h_BSH, labels_BS), labels_BS, self.mtp_weight)
        self._mtp_parts.append(dict(ce=ce.detach(), **parts))
        return loss

    def _run(self, batch_BS: torch.Tensor, train: bool) -> list[torch.Tensor]:
        """The schedule over ``batch``'s micro-batches (``eval`` without backward); the last stage's losses."""
        args = (batch_BS[:, :-1],) if self.holds_first else ()
        losses: list = []
        target = batch_BS[:, 1:] if self.holds_last else None
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=target, losses=losses if self.holds_last else None)
        return losses

    def _over_stages(self, value) -> list:
        """``value`` of every rank of ``pp_group``, in stage-rank order (a picklable object; ``[value]`` at pp 1)."""
        if self.parallel.pp_group is None:
            return [value]
        gathered = [None] * self.parallel.pp_size
        dist.all_gather_object(gathered, value, group=self.parallel.pp_group)
        return gathered

    def _across_stages(self, local: torch.Tensor) -> torch.Tensor:
        """Sum over ``pp_group`` (one rank per stage): a value only some stages hold, seen by all."""
        if self.parallel.pp_group is not None:
            dist.all_reduce(local, group=self.parallel.pp_group)
        return local

    def train_step(self, batch_BS: torch.Tensor, step: int) -> StepResult:
        cfg, model = self.cfg, self.model
        lr = lr_at(step, cfg)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        self._records.clear()
        self._mtp_parts.clear()
        losses = self._run(batch_BS, train=True)
        for p in model.parameters():  # the schedule summed the micro-batches' gradients
            if p.grad is not None:
                p.grad.div_(self.n_micro)
        self._sum_tied_gradients()
        sync_gradients(model, self.parallel)
        copy = self.rank_stages.tied_copy
        grad_norm = clip_gradients(model, self.parallel, cfg.grad_clip, pp_group=self.parallel.pp_group,
                                   uncounted=[copy] if copy is not None else ())
        self.optimizer.step()
        update_moe_bias(model)
        device = batch_BS.device
        names = ["mtp", *(f"mtp_{k}" for k in range(1, self.mtp_depth + 1))] if self.mtp_depth else []
        if self.mtp_depth:  # losses hold CE + L_MTP: the parts were kept apart
            ce, *parts = [torch.stack([p[name] for p in self._mtp_parts]).float().mean() if self._mtp_parts
                          else torch.zeros((), device=device) for name in ["ce", *names]]
        else:
            ce, parts = torch.stack(losses).float().mean() if losses else torch.zeros((), device=device), []
        aux = torch.stack([a.float() for _, a, _ in self._records]).sum() / self.n_micro if self._records \
            else torch.zeros((), device=device)
        ce, aux, *parts = self._across_stages(torch.stack([ce.detach(), aux, *parts])).unbind()
        return StepResult(ce, aux, grad_norm, self._stats_of_every_layer(), lr=lr, parts=dict(zip(names, parts)))

    def _sum_tied_gradients(self) -> None:
        """Tied embeddings with the first and the last stage on two ranks: both copies take the sum of their
        gradients (every rank of ``pp_group`` takes part; middle stages add zeros). On one rank (V schedules)
        the two stages share one parameter, whose gradient already holds both."""
        if not self.tied_across_ranks:
            return
        holder, rank = self.rank_stages.tied, self.rank_stages
        if holder is not None and holder.grad is not None:
            buffer = holder.grad
        else:
            buffer = torch.zeros(rank.vocab_size, rank.hidden_size, device=next(self.model.parameters()).device)
        dist.all_reduce(buffer, group=self.parallel.pp_group)
        if holder is not None:
            holder.grad = buffer

    def _stats_of_every_layer(self) -> list[list]:
        """Each micro-batch's MoE statistics of every layer of the model, in depth order (gathered over stages)."""
        per_micro: list[list] = [[] for _ in range(self.n_micro)]
        counts: dict[int, int] = {}
        for depth, _, stats in self._records:
            micro = counts.get(depth, 0)
            counts[depth] = micro + 1
            per_micro[micro].append((depth, stats))
        gathered = self._over_stages(per_micro)
        per_micro = [[item for stage in gathered for item in stage[m]] for m in range(self.n_micro)]
        return [[stats for _, stats in sorted(micro, key=lambda item: item[0])] for micro in per_micro]

    def evaluate(self, val_batches: list[torch.Tensor], parallel: ParallelState) -> float:
        """Mean validation cross-entropy over every rank's batches: the schedule's forward-only pass."""
        was_training = self.model.training
        self.model.eval()
        device = val_batches[0].device
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for batch in val_batches:
                losses = self._run(batch, train=False)
                if losses:
                    total[0] += torch.stack(losses).double().mean() * batch[:, 1:].numel()
                total[1] += batch[:, 1:].numel()
        total[0] = self._across_stages(total[:1].clone())[0]
        parallel.all_reduce_world(total)
        self.model.train(was_training)
        return (total[0] / total[1]).item()

    def moe_shape(self) -> tuple[int, int]:
        return self.n_moe_layers, self.n_experts

    def save(self, out_dir: Path, step: int, sampler: BatchSampler) -> Path:
        return save_checkpoint(out_dir, step, self.model, self.optimizer, sampler, self.parallel, self.cfg)

    def load(self, folder: Path, sampler: BatchSampler) -> int:
        return load_checkpoint(folder, self.model, self.optimizer, sampler, self.parallel, self.cfg)

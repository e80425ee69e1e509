"""``Distiller``: a frozen teacher, a trained student and ``DistillationLoss``, as a trainer of the driver.

One optimizer step (``train_step(windows, step)`` for the driver, ``optimize(input_ids, attention_mask,
labels)`` for explicit, possibly masked inputs), on every rank, over ``grad_accum`` micro-batches
(``moe_ep.training.step``), each under the training precision's autocast:

    teacher: eval mode, no_grad, teacher_dtype -> logits (+ hidden states, attentions when weighted)
    student: train mode, student_dtype         -> the same, with gradients
    total, parts = DistillationLoss(student, teacher, labels, mask, total_aux_loss(student))
    (total / N).backward()
then
    sync_gradients / clip_gradients over the student and the projections   (moe_ep/gradients.py)
    AdamW steps at lr_at(step)                                                (moe_ep/training/optim.py)
    update_moe_bias(student)

Under torchrun, pass the ``ParallelState`` of ``init_expert_parallel``: our
MoE teacher and student are then sharded over the expert-parallel group
(the teacher built with ``eval_capacity_factor=None``, so it drops no
token), transformers models are replicated, and every rank feeds its own
batch (the gradient convention of docs/training.md: each rank's loss is its
own token mean). Forwards of sharded models are collective: every rank
steps the same number of times.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..activation_checkpointing import enable_activation_checkpointing
from ..data import BatchSampler
from ..gradients import clip_gradients, sync_gradients
from ..model_moe import total_aux_loss, update_moe_bias
from ..parallel.state import ParallelState
from ..precision import resolve_dtype
from ..training.config import TrainConfig
from ..training.driver import Trainer, evaluate
from ..training.optim import build_optimizer, lr_at, set_lr
from ..training.step import StepResult, forward_backward, split_micro_batches
from .adapters import MODEL_DTYPES, TransformersCausalLM, lm_forward, lm_shape, load_lm
from .checkpoints import save_lm
from .losses import DistillationLoss

ModelSource = Union[str, Path, nn.Module]


class Distiller(Trainer):
    """Distil ``teacher`` into ``student`` (modules, or folders: see ``adapters.load_lm``).

    temperature, alpha, hidden_loss_weight, attention_loss_weight,
    relation_loss_weight, distill_method: ``DistillationLoss``'s.
    teacher_dtype / student_dtype: parameter dtypes (names or torch dtypes).
    device: default CUDA when present, else CPU.
    tokenizer: saved beside a transformers student by ``save_student``
        (byte-level models need none).
    parallel: the process's ``ParallelState`` (default: one process).
    train_config: optimizer, schedule and clipping (``TrainConfig``; its
        ``seed`` also draws the hidden-state projections).
    """

    def __init__(self, teacher: ModelSource, student: ModelSource, tokenizer: Optional[Any] = None,
                 temperature: float = 2.0, alpha: float = 0.5, hidden_loss_weight: float = 0.0,
                 attention_loss_weight: float = 0.0, relation_loss_weight: float = 0.0, distill_method: str = "kd",
                 device: Optional[Union[str, torch.device]] = None, teacher_dtype: Union[str, torch.dtype] = "float32",
                 student_dtype: Union[str, torch.dtype] = "float32", parallel: Optional[ParallelState] = None,
                 train_config: Optional[TrainConfig] = None):
        self.parallel = parallel or ParallelState()
        self.cfg = train_config or TrainConfig()
        self.precision = self.cfg.precision
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = tokenizer
        self.teacher = load_lm(teacher, self.parallel, self.device,
                               resolve_dtype(teacher_dtype, "distill: teacher_dtype", MODEL_DTYPES), as_teacher=True)
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.student = load_lm(student, self.parallel, self.device,
                               resolve_dtype(student_dtype, "distill: student_dtype", MODEL_DTYPES))
        self.student.train()
        t_shape, s_shape = lm_shape(self.teacher), lm_shape(self.student)
        if t_shape.vocab_size != s_shape.vocab_size:
            raise ValueError(f"Distiller: the teacher's vocabulary ({t_shape.vocab_size}) differs from the "
                             f"student's ({s_shape.vocab_size}); logits must cover the same tokens")
        self.loss = DistillationLoss(temperature, alpha, hidden_loss_weight, attention_loss_weight,
                                     relation_loss_weight, distill_method,
                                     layers=(s_shape.n_layers, t_shape.n_layers),
                                     hidden_sizes=(s_shape.hidden_size, t_shape.hidden_size),
                                     seed=self.cfg.seed).to(self.device)
        if self.loss.needs_attentions:
            for model in (self.teacher, self.student):
                if isinstance(model, TransformersCausalLM):
                    model.require_attentions()
        self.trainable = nn.ModuleDict(dict(student=self.student, loss=self.loss))
        self.optimizer = build_optimizer(self.student, self.cfg)
        self.projection_optimizer = build_optimizer(self.loss, self.cfg) if len(self.loss.projections) else None
        self.model = self.student  # what the driver validates and meters
        self.step = 0  # updates done: the next update's learning rate is lr_at(step)
        if self.cfg.activation_checkpointing:
            enable_activation_checkpointing(self.student.hf if isinstance(self.student, TransformersCausalLM)
                                            else self.student)

    def compute_loss(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher and student forwards and ``DistillationLoss`` (no update); ``(total, parts)``.

        labels: next-token targets aligned with the logits (for a window
        ``w``: ``input_ids = w[:, :-1]``, ``labels = w[:, 1:]``), ``-100`` ignored.
        """
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        labels = labels.to(self.device) if labels is not None else None
        flags = dict(output_hidden_states=self.loss.needs_hidden_states,
                     output_attentions=self.loss.needs_attentions)
        with torch.no_grad():
            teacher_out = lm_forward(self.teacher, input_ids, attention_mask, **flags)
        student_out = lm_forward(self.student, input_ids, attention_mask, **flags)
        return self.loss(student_out, teacher_out, labels, attention_mask, student_aux=total_aux_loss(self.student))

    def train_step(self, batch_BS: torch.Tensor, step: int) -> StepResult:
        """The driver's step: windows ``[B, S+1]`` (inputs ``w[:, :-1]``, labels ``w[:, 1:]``) at ``step``."""
        self.step = step
        micro = [(w[:, :-1], None, w[:, 1:]) for w in split_micro_batches(batch_BS, self.cfg.grad_accum)]
        return self._update(micro)

    def optimize(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 labels: Optional[torch.Tensor] = None) -> StepResult:
        """One optimizer step on explicit inputs (``compute_loss``'s arguments), split into ``grad_accum``
        micro-batches; the learning rate is ``lr_at(self.step)``."""
        n = self.cfg.grad_accum
        parts = [split_micro_batches(t, n) if t is not None else [None] * n
                 for t in (input_ids, attention_mask, labels)]
        return self._update(list(zip(*parts)))

    def _update(self, micro_batches: list[tuple]) -> StepResult:
        lr = lr_at(self.step, self.cfg)
        optimizers = [opt for opt in (self.optimizer, self.projection_optimizer) if opt is not None]
        for optimizer in optimizers:
            set_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        result = forward_backward(self.student, micro_batches, lambda micro: self.compute_loss(*micro),
                                  lambda loss, last: (loss / n).backward(), self.precision, self.device)
        sync_gradients(self.trainable, self.parallel)
        result.grad_norm = clip_gradients(self.trainable, self.parallel, self.cfg.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
        update_moe_bias(self.student)
        self.step += 1
        result.lr = lr
        return result

    def save(self, out_dir: Path, step: int, sampler: BatchSampler) -> Path:
        """The driver's checkpoint: ``save_student``."""
        return self.save_student(out_dir, sampler)

    def first_validation(self, val_batches: list[torch.Tensor], parallel: ParallelState) -> dict:
        """The teacher's validation loss (``teacher_val_loss``), on the same batches as the student's."""
        return dict(teacher_val_loss=evaluate(self.teacher, val_batches, parallel, self.precision))

    def save_student(self, output_dir: Union[str, Path], sampler: Optional[BatchSampler] = None) -> Path:
        """Write the student (collective): our checkpoint format, or ``save_pretrained`` for a transformers model.

        Our format records the data position, so it needs the run's
        ``sampler``; the tokenizer, when given, is saved beside a
        transformers student.
        """
        output_dir = Path(output_dir)
        if sampler is None and not isinstance(self.student, TransformersCausalLM):
            raise ValueError("Distiller.save_student: moe_ep's checkpoint format records the data position; "
                             "pass the run's BatchSampler")
        return save_lm(self.student, output_dir, self.step, self.optimizer, sampler, self.parallel, self.cfg,
                       tokenizer=self.tokenizer)

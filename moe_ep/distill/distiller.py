"""``Distiller``: a frozen teacher, a trained student and ``DistillationLoss``, on the expert-parallel runtime.

One ``train_step(input_ids, attention_mask, labels)`` on every rank:

    teacher: eval mode, no_grad, teacher_dtype -> logits (+ hidden states, attentions when weighted)
    student: train mode, student_dtype         -> the same, with gradients
    total, parts = DistillationLoss(student, teacher, labels, mask, student.aux_loss())
    total.backward()
    sync_gradients / clip_gradients over the student and the projections   (moe_ep/parallel/grads.py)
    AdamW steps at lr_at(step)                                                (moe_ep/training/optim.py)
    student.update_moe_bias()

Under torchrun, pass the ``ParallelState`` of ``init_expert_parallel``: our
MoE teacher and student are then sharded over the expert-parallel group
(the teacher built with ``eval_capacity_factor=None``, so it drops no
token), transformers models are replicated, and every rank feeds its own
batch (the gradient convention of docs/training.md: each rank's loss is its
own token mean). Forwards of sharded models are collective: every rank
calls ``train_step`` the same number of times.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..data import BatchSampler
from ..parallel.grads import clip_gradients, sync_gradients
from ..parallel.state import ParallelState
from ..training.config import TrainConfig
from ..training.optim import build_optimizer, lr_at, set_lr
from .adapters import TransformersCausalLM, lm_forward, lm_shape, load_lm, resolve_dtype
from .checkpoints import save_lm
from .losses import DistillationLoss

ModelSource = Union[str, Path, nn.Module]


class Distiller:
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
        unsupported = {k: getattr(self.cfg, k) for k, plain in (("precision", "fp32"), ("grad_accum", 1),
                                                                ("activation_checkpointing", False))
                       if getattr(self.cfg, k) != plain}
        if unsupported:
            raise ValueError(f"Distiller: {unsupported} are not supported by distillation (one fp32 batch per step, "
                             f"no checkpointing; student_dtype / teacher_dtype set the weights' dtypes)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = tokenizer
        self.teacher = load_lm(teacher, self.parallel, self.device, resolve_dtype(teacher_dtype), as_teacher=True)
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.student = load_lm(student, self.parallel, self.device, resolve_dtype(student_dtype))
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
        self.step = 0
        self.last_grad_norm = torch.zeros((), device=self.device)
        self.last_lr = 0.0

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
        return self.loss(student_out, teacher_out, labels, attention_mask, student_aux=self.student.aux_loss())

    def train_step(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step of the student (module docstring); returns the detached total and the parts."""
        lr = lr_at(self.step, self.cfg)
        optimizers = [opt for opt in (self.optimizer, self.projection_optimizer) if opt is not None]
        for optimizer in optimizers:
            set_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=True)
        total, parts = self.compute_loss(input_ids, attention_mask, labels)
        total.backward()
        sync_gradients(self.trainable, self.parallel)
        self.last_grad_norm = clip_gradients(self.trainable, self.parallel, self.cfg.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
        self.student.update_moe_bias()
        self.step += 1
        self.last_lr = lr
        return total.detach(), parts

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

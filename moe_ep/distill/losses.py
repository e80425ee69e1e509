"""Distillation losses: logits (KD, reverse KD, MSE), hidden states, attention maps, token relations.

Notation: ``z^s``, ``z^t`` student and teacher logits ``[B, S, V]``; ``T``
the temperature; ``p^t = softmax(z^t / T)``, ``p^s = softmax(z^s / T)``;
``m`` the token mask ``[B, S]`` (False: ignored); ``N = sum(m)``. Every
per-token term is averaged over the unmasked tokens, in fp32:

    kd          T^2 / N * sum_{m} KL(p^t || p^s)           (Hinton et al. 2015)
    reverse_kd  T^2 / N * sum_{m} KL(p^s || p^t)
    mse         1 / N * sum_{m} mean_v (z^s - z^t)^2        (no temperature)
    hidden      mean over mapped layers (j, k) of 1 / N * sum_{m} mean_h (W_j h^s_j - h^t_k)^2
    attention   mean over mapped layers (j, k) of 1 / N * sum_{m, query i} KL(a^t_{k,i} || a^s_{j,i}),
                a = attention probabilities averaged over heads
    relation    1 / sum_{i,j} m_i m_j * sum m_i m_j (C^s_ij - C^t_ij)^2,
                C_ij = cos(h_i, h_j) of the last hidden states

``DistillationLoss`` combines them:

    total = alpha * distill + (1 - alpha) * CE(z^s, labels)
            + w_hidden * hidden + w_attention * attention + w_relation * relation + student aux loss

Layers are mapped evenly: student block ``j`` (1..L_s) to teacher block
``ceil(j * L_t / L_s)``, so the last blocks meet. ``W_j`` is a learned
linear map from the student's width to the teacher's (none when equal).
Hidden states follow transformers' convention (index 0 the embeddings, the
last one after the final norm); attentions are ``[B, heads, S, S]``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

DISTILL_METHODS = ("kd", "reverse_kd", "mse")
IGNORE_INDEX = -100


def masked_token_mean(values_BS: torch.Tensor, mask_BS: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of per-token values over the positions where ``mask`` is True (all when None); 0 if none is."""
    if mask_BS is None:
        return values_BS.mean()
    if mask_BS.shape != values_BS.shape:
        raise ValueError(f"distill: mask shape {tuple(mask_BS.shape)} differs from the tokens' "
                         f"{tuple(values_BS.shape)}")
    mask_BS = mask_BS.bool()
    return torch.where(mask_BS, values_BS, 0.0).sum() / mask_BS.sum().clamp_min(1)


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distill: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (same tokens and vocabulary needed)")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, summed over the vocabulary, token mean."""
    _check_logits(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl_BS = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return temperature ** 2 * masked_token_mean(kl_BS, mask)


def reverse_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T^2 * KL(softmax(student / T) || softmax(teacher / T))`` (mode seeking), token mean."""
    return kd_loss(teacher_logits, student_logits, temperature, mask)


def logits_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Squared logit difference, mean over the vocabulary, token mean; ``temperature`` is not used."""
    _check_logits(student_logits, teacher_logits)
    return masked_token_mean((student_logits.float() - teacher_logits.float()).pow(2).mean(-1), mask)


LOGIT_LOSSES = {"kd": kd_loss, "reverse_kd": reverse_kd_loss, "mse": logits_mse_loss}


def label_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy of ``labels`` (aligned with the logits) over tokens unmasked and not ``-100``."""
    ce_BS = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="none").view_as(labels_BS)
    keep_BS = labels_BS != IGNORE_INDEX
    return masked_token_mean(ce_BS, keep_BS if mask is None else keep_BS & mask.bool())


def map_layers(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """``(j, ceil(j * L_t / L_s))`` for student blocks ``j = 1..L_s`` (1-based block numbers)."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"map_layers: need at least one block each, got {student_layers} and {teacher_layers}")
    return [(j, math.ceil(j * teacher_layers / student_layers)) for j in range(1, student_layers + 1)]


def attention_kl(student_probs: torch.Tensor, teacher_probs: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(teacher || student) of head-averaged attention rows ``[B, N, S, S]``, summed over keys, token mean."""
    if student_probs.shape[-2:] != teacher_probs.shape[-2:] or student_probs.shape[0] != teacher_probs.shape[0]:
        raise ValueError(f"distill: attention maps {tuple(student_probs.shape)} and {tuple(teacher_probs.shape)} "
                         f"differ in batch or sequence")
    a_s = student_probs.float().mean(1)
    a_t = teacher_probs.float().mean(1)
    kl_BS = (torch.xlogy(a_t, a_t) - a_t * a_s.clamp_min(torch.finfo(torch.float32).tiny).log()).sum(-1)
    return masked_token_mean(kl_BS, mask)


def relation_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between the token-by-token cosine-similarity matrices ``[B, S, S]``, over pairs of unmasked tokens."""
    def cosine_BSS(h_BSH: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(h_BSH.float(), dim=-1)
        return unit @ unit.transpose(-1, -2)

    sq_BSS = (cosine_BSS(student_hidden) - cosine_BSS(teacher_hidden)).pow(2)
    if mask is None:
        return sq_BSS.mean()
    pair_BSS = mask.bool()[:, :, None] & mask.bool()[:, None, :]
    return torch.where(pair_BSS, sq_BSS, 0.0).sum() / pair_BSS.sum().clamp_min(1)


class DistillationLoss(nn.Module):
    """The combined loss of the module docstring; holds the hidden-state projections ``W_j``.

    layers: ``(L_s, L_t)`` blocks of student and teacher; needed by the
        hidden and attention terms.
    hidden_sizes: ``(H_s, H_t)`` widths; needed by the hidden term (a
        projection per mapped layer when they differ, drawn from ``seed``).
    ``forward`` returns ``(total, parts)``; parts holds the detached terms
    that were computed: ``distill``, ``ce`` (with labels), ``hidden``,
    ``attention``, ``relation`` (when weighted), ``aux`` (when given), ``total``.
    """

    def __init__(self, temperature: float = 2.0, alpha: float = 0.5, hidden_loss_weight: float = 0.0,
                 attention_loss_weight: float = 0.0, relation_loss_weight: float = 0.0, distill_method: str = "kd",
                 layers: Optional[tuple[int, int]] = None, hidden_sizes: Optional[tuple[int, int]] = None,
                 seed: int = 0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"DistillationLoss.temperature: must be positive, got {temperature!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"DistillationLoss.alpha: must lie in [0, 1], got {alpha!r}")
        for name, weight in (("hidden_loss_weight", hidden_loss_weight), ("attention_loss_weight",
                             attention_loss_weight), ("relation_loss_weight", relation_loss_weight)):
            if not weight >= 0:
                raise ValueError(f"DistillationLoss.{name}: must be non-negative, got {weight!r}")
        if distill_method not in LOGIT_LOSSES:
            raise ValueError(f"DistillationLoss.distill_method: {distill_method!r} is not one of {DISTILL_METHODS}")
        if (hidden_loss_weight or attention_loss_weight) and layers is None:
            raise ValueError("DistillationLoss: hidden and attention losses need layers=(student, teacher) blocks")
        if hidden_loss_weight and hidden_sizes is None:
            raise ValueError("DistillationLoss: the hidden loss needs hidden_sizes=(student, teacher) widths")
        self.temperature, self.alpha, self.distill_method = temperature, alpha, distill_method
        self.hidden_loss_weight = hidden_loss_weight
        self.attention_loss_weight = attention_loss_weight
        self.relation_loss_weight = relation_loss_weight
        self.layers = layers
        self.layer_pairs = map_layers(*layers) if layers is not None else []
        self.projections = nn.ModuleList()
        if hidden_loss_weight and hidden_sizes[0] != hidden_sizes[1]:
            generator = torch.Generator().manual_seed(seed)
            for _ in self.layer_pairs:
                projection = nn.Linear(hidden_sizes[0], hidden_sizes[1], bias=False)
                with torch.no_grad():
                    projection.weight.normal_(0.0, hidden_sizes[0] ** -0.5, generator=generator)
                self.projections.append(projection)

    @property
    def needs_hidden_states(self) -> bool:
        return bool(self.hidden_loss_weight or self.relation_loss_weight)

    @property
    def needs_attentions(self) -> bool:
        return bool(self.attention_loss_weight)

    def _states(self, output, field: str, who: str, expected: Optional[int]) -> tuple[torch.Tensor, ...]:
        """``output.<field>``, checked to be present (and ``expected`` long when given)."""
        states = getattr(output, field)
        if states is None or (expected is not None and len(states) != expected):
            got = "none" if states is None else len(states)
            raise ValueError(f"DistillationLoss: expected {expected or 'some'} {field} from the {who}, got {got}")
        return states

    def hidden_loss(self, student_hidden, teacher_hidden, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Projected hidden-state MSE averaged over the mapped layers."""
        terms = []
        for i, (j, k) in enumerate(self.layer_pairs):
            h_s = student_hidden[j].float()
            if len(self.projections):
                h_s = self.projections[i](h_s.to(self.projections[i].weight.dtype)).float()
            terms.append(masked_token_mean((h_s - teacher_hidden[k].float()).pow(2).mean(-1), mask))
        return torch.stack(terms).mean()

    def forward(self, student, teacher, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                student_aux: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``student`` / ``teacher``: outputs with ``logits`` (and ``hidden_states`` / ``attentions`` as needed).

        labels: next-token targets aligned with the logits (``-100`` ignored);
        None only when ``alpha == 1``. attention_mask: ``[B, S]``, 0/False
        positions are left out of every term.
        """
        if labels is None and self.alpha < 1:
            raise ValueError(f"DistillationLoss: alpha={self.alpha} < 1 weighs a label loss; pass labels or set alpha=1")
        mask = attention_mask.bool() if attention_mask is not None else None
        parts = {"distill": LOGIT_LOSSES[self.distill_method](student.logits, teacher.logits, self.temperature, mask)}
        total = self.alpha * parts["distill"]
        if labels is not None:
            parts["ce"] = label_loss(student.logits, labels, mask)
            total = total + (1 - self.alpha) * parts["ce"]
        if self.needs_hidden_states:
            n_s, n_t = (n + 1 for n in self.layers) if self.layers else (None, None)
            student_hidden = self._states(student, "hidden_states", "student", n_s)
            teacher_hidden = self._states(teacher, "hidden_states", "teacher", n_t)
            if self.hidden_loss_weight:
                parts["hidden"] = self.hidden_loss(student_hidden, teacher_hidden, mask)
                total = total + self.hidden_loss_weight * parts["hidden"]
            if self.relation_loss_weight:
                parts["relation"] = relation_loss(student_hidden[-1], teacher_hidden[-1], mask)
                total = total + self.relation_loss_weight * parts["relation"]
        if self.attention_loss_weight:
            student_attn = self._states(student, "attentions", "student", self.layers[0])
            teacher_attn = self._states(teacher, "attentions", "teacher", self.layers[1])
            parts["attention"] = torch.stack([attention_kl(student_attn[j - 1], teacher_attn[k - 1], mask)
                                              for j, k in self.layer_pairs]).mean()
            total = total + self.attention_loss_weight * parts["attention"]
        if student_aux is not None:
            parts["aux"] = student_aux.float()
            total = total + parts["aux"]
        parts = {name: value.detach() for name, value in parts.items()}
        parts["total"] = total.detach()
        return total, parts

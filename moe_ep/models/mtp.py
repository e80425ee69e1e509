"""Multi-token prediction (DeepSeek-V3 report, section 2.2): ``mtp_depth = D`` sequential modules after the model.

A training sequence is the tokens ``t_0 .. t_S``; the model reads ``t_0 .. t_{S-1}``, and ``h^0_i``, its last
block's output at position ``i`` (before the final norm), predicts ``t_{i+1}``. Module ``k = 1 .. D`` runs over
the positions ``i = 0 .. S-1-k`` (each depth one shorter: its last position would have no target):

    x^k_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])      eh_proj: [2H -> H], no bias
    h^k   = Block_k(x^k)                                           one causal transformer block
    logits^k_i = Head(head_norm(h^k_i))                            predicts t_{i+k+1}

``Emb`` and ``Head`` are the model's own embedding and output head (shared parameters, not copies); ``Block_k``
is an MoE block when the model's last block is one, else dense. The losses (``moe_ep.training.mtp``) are
``CE_k`` of ``logits^k`` against ``t_{k+1} .. t_S`` and ``lambda / D * sum_k CE_k``.

Parameters: module ``k`` is ``mtp.<n_layers + k - 1>`` of ``MoETransformerLM`` (on the last pipeline stage):
``enorm``, ``hnorm``, ``eh_proj``, ``head_norm`` and ``block`` (``attn_norm``, ``attn``, ``ffn_norm``, ``ffn``),
initialised like the model's other weights from generators keyed by their names, so adding modules changes no
other weight. The model's logits never depend on them: inference runs ``forward`` without ``mtp_labels``.

DeepSeek-V3's files on the hub store the module as one more decoder layer after ``num_hidden_layers`` (61), with
``num_nextn_predict_layers`` (1) in config.json: ``model.layers.61.`` + ``enorm``, ``hnorm``, ``eh_proj`` (the
embedding's half first, as here), ``shared_head.norm`` (our ``head_norm``), ``input_layernorm`` /
``post_attention_layernorm`` / ``self_attn`` / ``mlp`` (our ``block``'s), and ``embed_tokens`` and
``shared_head.head``, copies of the model's embedding and head, which this package shares instead of storing.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..half_matmul import Linear
from .layers import RMSNorm


class MTPModule(nn.Module):
    """One MTP depth (module docstring): ``combine(h_prev, emb)`` then ``block``; ``head_norm`` before the head."""

    def __init__(self, hidden_size: int, norm_eps: float, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(hidden_size, norm_eps)
        self.hnorm = RMSNorm(hidden_size, norm_eps)
        self.eh_proj = Linear(2 * hidden_size, hidden_size, bias=False)
        self.block = block
        self.head_norm = RMSNorm(hidden_size, norm_eps)

    def combine(self, h_prev_BSH: torch.Tensor, emb_BSH: torch.Tensor) -> torch.Tensor:
        """``eh_proj([enorm(emb) ; hnorm(h_prev)])``: the block's input ``[B, S, H]``."""
        return self.eh_proj(torch.cat([self.enorm(emb_BSH), self.hnorm(h_prev_BSH)], dim=-1))


def mtp_forward(modules: nn.ModuleDict, embed: nn.Embedding, head: Callable[[torch.Tensor, nn.Module], torch.Tensor],
               h_BSH: torch.Tensor, labels_BS: torch.Tensor,
               run_block: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None) -> list[torch.Tensor]:
    """Each depth's logits ``[B, S-k, V]`` (module docstring), ``k = 1 .. len(modules)``.

    ``h_BSH``: the model's last block's output over ``t_0 .. t_{S-1}``; ``labels_BS``: ``t_1 .. t_S`` (the model's
    own targets); ``head(h, norm)``: the output head over ``norm(h)``; ``run_block(block, x)``: the block's output
    (default ``block(x)[0]``; the model passes its activation checkpointing).
    """
    S = labels_BS.shape[1]
    if h_BSH.shape[1] != S:
        raise ValueError(f"MTP: hidden states of {h_BSH.shape[1]} positions for {S} labels")
    if len(modules) >= S:
        raise ValueError(f"MTP: mtp_depth {len(modules)} needs sequences of more than {len(modules)} targets, "
                         f"got {S}")
    run_block = run_block or (lambda block, x: block(x)[0])
    out = []
    for k, module in enumerate(modules.values(), start=1):
        x_BSH = module.combine(h_BSH[:, :S - k], embed(labels_BS[:, k - 1:S - 1]))
        h_BSH = run_block(module.block, x_BSH)
        out.append(head(h_BSH, module.head_norm))
    return out

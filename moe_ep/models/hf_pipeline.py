"""One rank's pipeline stages of a transformers DeepSeek causal LM made expert-parallel (``moe_ep.hf_model``).

A transformers ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM`` (``model.embed_tokens``,
``model.layers``, ``model.norm``, ``model.rotary_emb``, ``lm_head``) is cut as ``MoETransformerLM`` is
(``moe_ep.models.pipeline``): contiguous runs of decoder layers; stage 0 also embeds, the last stage also
applies the final norm and the head. ``hf_rank_stages`` keeps the model object and drops what this rank
does not run (the other stages' decoder layers, the embedding without stage 0, the norm and head without
the last stage), so its ``state_dict`` is this rank's share under transformers' own names and the
checkpoints reshard it like any model.

Each stage runs, on ``x`` (token ids on stage 0, else the hidden states ``[B, S, H]``):

    h = embed_tokens(x)                                  (stage 0)
    position_ids = 0 .. S-1;  cos, sin = rotary_emb(h, position_ids)
    mask = transformers' causal mask (no padding, no cache)
    h = layer(h, attention_mask=mask, position_ids, position_embeddings=(cos, sin))   for its layers
    return lm_head(norm(h))                              (last stage; else h)

which is what ``DeepseekV*Model.forward`` and the causal LM's head do for a batch without padding and
without a KV cache. Tied word embeddings are supported only when the first and the last stage share a rank
(the V schedules): the head is then the embedding itself.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .pipeline import RankStages


class HFStage(nn.Module):
    """Stage ``index`` of ``causal_lm``: its decoder ``layers`` (global indices), the embedding when ``first``,
    the norm and head when ``last`` (module docstring)."""

    def __init__(self, causal_lm: nn.Module, layers: Sequence[int], first: bool, last: bool):
        super().__init__()
        body = causal_lm.model
        self.config = causal_lm.config
        self.embed_tokens = body.embed_tokens if first else None
        self.rotary_emb = body.rotary_emb
        self.layers = nn.ModuleDict({str(i): body.layers[i] for i in layers})
        self.norm = body.norm if last else None
        self.lm_head = causal_lm.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                                  position_ids=position_ids)
        position_embeddings = self.rotary_emb(h, position_ids)
        for layer in self.layers.values():
            h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
        if self.lm_head is None:
            return h
        return self.lm_head(self.norm(h))


class _Dropped(nn.Module):
    """Where a decoder layer of another rank's stage was: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this decoder layer belongs to another pipeline stage's rank")


def hf_rank_stages(causal_lm: nn.Module, stage_indices: Sequence[int], blocks: Sequence[range]) -> RankStages:
    """This rank's stages of ``causal_lm`` (``blocks``: the decoder layers of every stage), which is pruned in
    place to them and stays the module that holds them under transformers' names (module docstring)."""
    n_stages = len(blocks)
    first, last = 0 in stage_indices, n_stages - 1 in stage_indices
    config = causal_lm.config
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and first != last:
        raise ValueError("a transformers model with tie_word_embeddings has its first and last pipeline stages on "
                         "different ranks here; use a V schedule (zbv, dualpipev), which puts both on one rank, or "
                         "untie the embeddings")
    stages = {index: HFStage(causal_lm, blocks[index], index == 0, index == n_stages - 1) for index in stage_indices}
    kept = {i for index in stage_indices for i in blocks[index]}
    body = causal_lm.model
    for i in range(len(body.layers)):
        if i not in kept:
            body.layers[i] = _Dropped()
    if not first:
        body.embed_tokens = None
    if not last:
        body.norm, causal_lm.lm_head = None, None
    return RankStages(module=causal_lm, stages=stages, hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                      n_layers=config.num_hidden_layers, tied=body.embed_tokens.weight if tied and first else None)

"""``MoETransformerLM``: a decoder-only language model whose FFNs are ``MoELayer``s.

    h_0 = embed(ids)
    h   = h + attn(norm(h))                      every block
    h   = h + ffn(norm(h))                       DenseFFN for the first k blocks, MoELayer after
    logits = lm_head(norm(h))                    lm_head = embed^T when tied

Multi-token prediction: with ``mtp_depth > 0`` the model also holds
DeepSeek-V3's MTP modules (``moe_ep.models.mtp``, ``mtp.<n_layers + k - 1>``);
``forward(ids, mtp_labels=labels)`` returns their logits too
(``LMOutput.mtp_logits``), a plain ``forward(ids)`` never runs them.

Parallel contract: pass the ``ParallelState`` of ``init_expert_parallel``;
every MoE layer then holds only this rank's experts (``experts.w_in``,
``experts.w_out``), and every other parameter is a full replica. Weights
are drawn from generators keyed by (seed, parameter name, global expert id),
so any layout (and any rank of it) starts from the same global model:
replicas agree bitwise and an expert shard equals the matching slice of the
single-process model.

Balancing contract: after ``forward``, ``model_moe.total_aux_loss(model)`` is
the sum of the MoE layers' auxiliary losses (add it to the training loss);
the trainers call ``model_moe.update_moe_bias(model)`` once per optimizer
step, after ``optimizer.step()``, which applies DeepSeek-V3's bias update to
layers with ``aux_free_bias`` from the loads routed since the previous call.

Activation checkpointing: with ``activation_checkpointing = True``, every
block of a training forward with gradients runs under
``moe_ep.activation_checkpointing.checkpoint_block`` (only its input is kept;
it is recomputed in backward, its MoE layer replaying its first forward).

Pipeline stages: ``stage=StageSpec(blocks, first, last)`` builds only the
blocks ``blocks`` of the model, the embedding when ``first``, the final norm
and the output head when ``last`` (with tied embeddings the last stage holds
its own copy of the embedding as the head, ``embed.weight``; the pipeline
trainer sums the two copies' gradients). Parameter names (``layers.<i>.``)
and values are the full model's, so checkpoints are layout-free across
stages too. A first stage maps ids to hidden states, a middle one hidden
states to hidden states, a last one hidden states to logits. The MTP modules
live on the last stage, which then holds the embedding too (a copy, as for
tied embeddings, when the first stage is on another rank).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..activation_checkpointing import checkpoint_block
from ..half_matmul import Linear, linear
from ..layer import MoELayer
from ..parallel.state import ParallelState
from .config import ModelConfig
from .layers import CausalSelfAttention, DenseFFN, RMSNorm
from .mtp import MTPModule, mtp_forward

_EMBED_STD = 0.02
_OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "experts.w_out")


@dataclass(frozen=True)
class StageSpec:
    """The part of the model a pipeline stage holds: the blocks ``blocks`` (global indices), and whether it is
    the first stage (embedding) and the last (final norm and head)."""

    blocks: range
    first: bool
    last: bool


@dataclass
class LMOutput:
    """What ``MoETransformerLM.forward`` returns when hidden states or attentions are asked for."""

    logits: torch.Tensor
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None
    mtp_logits: Optional[tuple[torch.Tensor, ...]] = None


class Block(nn.Module):
    """Pre-norm block: attention then a dense or MoE FFN (``dense``), each inside a residual; ``name``: its module
    path (named in the MoE layer's errors)."""

    def __init__(self, config: ModelConfig, parallel: ParallelState, dense: bool, name: str):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = CausalSelfAttention(config.hidden_size, config.n_heads, config.max_seq_len, config.rope_theta)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        if dense:
            self.ffn = DenseFFN(config.hidden_size, config.dense_intermediate_size)
        else:
            self.ffn = MoELayer(config.moe, parallel=parallel, name=f"{name}.ffn")

    def forward(self, x_BSH: torch.Tensor,
                output_attentions: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(block output, attention probabilities ``[B, N, S, S]`` when ``output_attentions`` else None)."""
        attn_out, probs_BNSS = self.attn(self.attn_norm(x_BSH), output_attentions)
        x_BSH = x_BSH + attn_out
        return x_BSH + self.ffn(self.ffn_norm(x_BSH)), probs_BNSS


def _generator(seed: int, *key) -> torch.Generator:
    digest = hashlib.blake2b("/".join(str(k) for k in (seed, *key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))


class MoETransformerLM(nn.Module):
    """``forward(input_ids [B, S]) -> logits [B, S, vocab]`` (causal); ``moe_ep.model_moe`` finds its MoE layers.

    ``activation_checkpointing`` (False): checkpoint every block in training forwards (module docstring).
    """

    def __init__(self, config: ModelConfig, parallel: Optional[ParallelState] = None, seed: int = 0,
                 stage: Optional[StageSpec] = None):
        super().__init__()
        self.config = config
        self.parallel = parallel or ParallelState()
        self.stage = stage or StageSpec(range(config.n_layers), first=True, last=True)
        first, last = self.stage.first, self.stage.last
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size) \
            if first or (last and config.last_stage_embeds) else None
        # keyed by global block index: the parameter names of a stage are the full model's
        self.layers = nn.ModuleDict({str(i): Block(config, self.parallel, i < config.first_k_dense, f"layers.{i}")
                                     for i in self.stage.blocks})
        self.norm = RMSNorm(config.hidden_size, config.norm_eps) if last else None
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False) \
            if last and not config.tie_embeddings else None
        mtp_dense = config.first_k_dense == config.n_layers  # as the model's last block
        self.mtp = nn.ModuleDict({
            str(i): MTPModule(config.hidden_size, config.norm_eps,
                              Block(config, self.parallel, mtp_dense, f"mtp.{i}.block"))
            for i in range(config.n_layers, config.n_layers + config.mtp_depth)}) \
            if last and config.mtp_depth else None
        self.activation_checkpointing = False
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Draw every weight from its own generator (see the module docstring).

        Norm weights are 1; the embedding and output head are N(0, 0.02); every other matrix is
        N(0, 1/fan_in), output projections (attention, FFN and expert
        ``down``) further scaled by ``1/sqrt(2 * n_layers)``.
        """
        out_scale = (2 * self.config.n_layers) ** -0.5
        for name, param in self.named_parameters():
            if isinstance(self.get_submodule(name.rsplit(".", 1)[0]), RMSNorm):
                param.fill_(1.0)
                continue
            if name in ("embed.weight", "lm_head.weight"):
                std = _EMBED_STD
            else:
                fan_in = param.shape[1] if ".experts." in name else param.shape[-1]
                std = fan_in ** -0.5 * (out_scale if name.endswith(_OUTPUT_PROJECTIONS) else 1.0)
            if ".experts." in name:  # each slot from its logical expert's generator (replicas alike)
                layer = self.get_submodule(name.rsplit(".", 2)[0])
                for local, global_id in enumerate(layer.local_expert_ids().tolist()):
                    param[local].normal_(0.0, std, generator=_generator(seed, name, global_id))
            else:
                param.normal_(0.0, std, generator=_generator(seed, name))

    def forward(self, input_ids_BS: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False,
                mtp_labels: Optional[torch.Tensor] = None) -> Union[torch.Tensor, LMOutput]:
        """Logits ``[B, S, vocab]``; an ``LMOutput`` instead when a flag is set or ``mtp_labels`` given.

        ``hidden_states`` follows transformers' convention: the embedding
        output, the output of blocks 1 .. L-1, then the final norm's output
        (``n_layers + 1`` tensors). ``attentions`` holds each block's
        probabilities ``[B, N, S, S]`` (explicit softmax, see
        ``CausalSelfAttention``); SDPA runs when it is not asked for.
        A pipeline stage (module docstring) takes ids when first, else hidden
        states ``[B, S, H]``, and returns logits when last, else hidden states.
        ``mtp_labels`` (``[B, S]``, the next tokens ``t_1 .. t_S`` of the input
        ``t_0 .. t_{S-1}``): also each MTP depth's logits ``[B, S-k, vocab]``
        (``moe_ep.models.mtp``; a model without MTP modules raises).
        """
        h_BSH, hidden, attentions = self.run_blocks(input_ids_BS, output_hidden_states, output_attentions)
        if not self.stage.last:
            return h_BSH
        normed_BSH = self.norm(h_BSH)
        logits_BSV = linear(normed_BSH, self.head_weight())
        extra = None if mtp_labels is None else tuple(self.mtp_logits(h_BSH, mtp_labels))
        if not (output_hidden_states or output_attentions or extra is not None):
            return logits_BSV
        if hidden is not None:
            hidden[-1] = normed_BSH
        return LMOutput(logits=logits_BSV, hidden_states=None if hidden is None else tuple(hidden),
                        attentions=None if attentions is None else tuple(attentions), mtp_logits=extra)

    def run_blocks(self, input_ids_BS: torch.Tensor, output_hidden_states: bool = False,
                   output_attentions: bool = False) -> tuple[torch.Tensor, Optional[list], Optional[list]]:
        """(the last block's output ``[B, S, H]``, the hidden states and attentions of ``forward`` when asked for):
        the embedding (first stage) and the blocks, without the final norm and head."""
        h_BSH = self.embed(input_ids_BS) if self.stage.first else input_ids_BS
        # kept only when asked for: under no_grad each block's output is freed as the next one runs
        hidden = [h_BSH] if output_hidden_states else None
        attentions = [] if output_attentions else None
        checkpointed = self._checkpointed()
        for block in self.layers.values():
            if checkpointed:
                h_BSH, probs_BNSS = checkpoint_block(block, h_BSH, output_attentions)
            else:
                h_BSH, probs_BNSS = block(h_BSH, output_attentions)
            if hidden is not None:
                hidden.append(h_BSH)
            if attentions is not None:
                attentions.append(probs_BNSS)
        return h_BSH, hidden, attentions

    def _checkpointed(self) -> bool:
        return self.activation_checkpointing and self.training and torch.is_grad_enabled()

    def head_weight(self) -> torch.Tensor:
        """The output head ``[vocab, H]`` (the embedding when tied); last stage only."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h_BSH: torch.Tensor) -> torch.Tensor:
        """The head over the final norm: logits ``[B, S, vocab]`` of the last block's output ``h``."""
        return linear(self.norm(h_BSH), self.head_weight())

    def mtp_logits(self, h_BSH: torch.Tensor, labels_BS: torch.Tensor) -> list[torch.Tensor]:
        """Each MTP depth's logits ``[B, S-k, vocab]`` from the last block's output ``h`` and the next tokens
        ``labels`` (``moe_ep.models.mtp.mtp_forward``; blocks checkpointed as the model's are)."""
        if self.mtp is None:
            raise ValueError(f"MoETransformerLM: mtp_labels given, but this model has no MTP modules "
                             f"(mtp_depth {self.config.mtp_depth}, last stage: {self.stage.last})")
        checkpointed = self._checkpointed()

        def run_block(block: nn.Module, x_BSH: torch.Tensor) -> torch.Tensor:
            return (checkpoint_block(block, x_BSH, False) if checkpointed else block(x_BSH))[0]

        def head(x_BSH: torch.Tensor, norm: nn.Module) -> torch.Tensor:
            return linear(norm(x_BSH), self.head_weight())

        return mtp_forward(self.mtp, self.embed, head, h_BSH, labels_BS, run_block)

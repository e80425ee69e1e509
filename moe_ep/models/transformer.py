"""``MoETransformerLM``: a decoder-only language model whose FFNs are ``MoELayer``s.

    h_0 = embed(ids)
    h   = h + attn(norm(h))                      every block
    h   = h + ffn(norm(h))                       DenseFFN for the first k blocks, MoELayer after
    logits = lm_head(norm(h))                    lm_head = embed^T when tied

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
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..activation_checkpointing import checkpoint_block
from ..layer import MoELayer
from ..parallel.state import ParallelState
from .config import ModelConfig
from .layers import CausalSelfAttention, DenseFFN, RMSNorm

_EMBED_STD = 0.02
_OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "experts.w_out")


@dataclass
class LMOutput:
    """What ``MoETransformerLM.forward`` returns when hidden states or attentions are asked for."""

    logits: torch.Tensor
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None


class Block(nn.Module):
    """Pre-norm block: attention then a dense or MoE FFN, each inside a residual."""

    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelState):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = CausalSelfAttention(config.hidden_size, config.n_heads, config.max_seq_len, config.rope_theta)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        if layer_idx < config.first_k_dense:
            self.ffn = DenseFFN(config.hidden_size, config.dense_intermediate_size)
        else:
            self.ffn = MoELayer(config.moe, parallel=parallel, name=f"layers.{layer_idx}.ffn")

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

    def __init__(self, config: ModelConfig, parallel: Optional[ParallelState] = None, seed: int = 0):
        super().__init__()
        self.config = config
        self.parallel = parallel or ParallelState()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, self.parallel) for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                    bias=False)
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
        first_expert, _ = self.parallel.expert_range(self.config.moe.n_routed_experts)
        for name, param in self.named_parameters():
            if isinstance(self.get_submodule(name.rsplit(".", 1)[0]), RMSNorm):
                param.fill_(1.0)
                continue
            if name in ("embed.weight", "lm_head.weight"):
                std = _EMBED_STD
            else:
                fan_in = param.shape[1] if ".experts." in name else param.shape[-1]
                std = fan_in ** -0.5 * (out_scale if name.endswith(_OUTPUT_PROJECTIONS) else 1.0)
            if ".experts." in name:
                for local, global_id in enumerate(range(first_expert, first_expert + param.shape[0])):
                    param[local].normal_(0.0, std, generator=_generator(seed, name, global_id))
            else:
                param.normal_(0.0, std, generator=_generator(seed, name))

    def forward(self, input_ids_BS: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False) -> Union[torch.Tensor, LMOutput]:
        """Logits ``[B, S, vocab]``; an ``LMOutput`` instead when either flag is set.

        ``hidden_states`` follows transformers' convention: the embedding
        output, the output of blocks 1 .. L-1, then the final norm's output
        (``n_layers + 1`` tensors). ``attentions`` holds each block's
        probabilities ``[B, N, S, S]`` (explicit softmax, see
        ``CausalSelfAttention``); SDPA runs when it is not asked for.
        """
        h_BSH = self.embed(input_ids_BS)
        # kept only when asked for: under no_grad each block's output is freed as the next one runs
        hidden = [h_BSH] if output_hidden_states else None
        attentions = [] if output_attentions else None
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if checkpointed:
                h_BSH, probs_BNSS = checkpoint_block(block, h_BSH, output_attentions)
            else:
                h_BSH, probs_BNSS = block(h_BSH, output_attentions)
            if hidden is not None:
                hidden.append(h_BSH)
            if attentions is not None:
                attentions.append(probs_BNSS)
        h_BSH = self.norm(h_BSH)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits_BSV = F.linear(h_BSH, weight)
        if not (output_hidden_states or output_attentions):
            return logits_BSV
        if hidden is not None:
            hidden[-1] = h_BSH
        return LMOutput(logits=logits_BSV, hidden_states=None if hidden is None else tuple(hidden),
                        attentions=None if attentions is None else tuple(attentions))

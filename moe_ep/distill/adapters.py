"""Teachers and students behind one interface: our ``MoETransformerLM`` and transformers causal LMs.

Every model the distiller handles is an ``nn.Module`` whose ``forward(input_ids)``
returns logits ``[B, S, V]`` (so ``moe_ep.training.evaluate`` and the
optimizer helpers apply); ``moe_ep.model_moe`` finds the MoE layers of either.
``lm_forward`` returns an ``LMOutput`` with the hidden states and attention
probabilities when asked for, with transformers' conventions for both.

``load_lm`` takes a module or a folder:

* a folder with ``config.json``: ``moe_ep.hf_model.load_causal_lm`` (local
  files only; nothing is downloaded), wrapped in ``TransformersCausalLM`` and
  replicated on every rank;
* any other folder: a checkpoint of ``launch/train.py`` (``distill.checkpoints``),
  built at this process's expert-parallel layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..hf_model import load_causal_lm
from ..models import MoETransformerLM
from ..models.transformer import LMOutput
from ..parallel.state import ParallelState
from ..model_moe import moe_layers
from .checkpoints import load_lm_checkpoint

MODEL_DTYPES = ("float32", "bfloat16", "float16")  # the parameter dtypes a teacher or student may have


class TransformersCausalLM(nn.Module):
    """A transformers ``*ForCausalLM`` with moe_ep's language-model interface (``self.hf`` is the model)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def require_attentions(self) -> None:
        """Switch to eager attention, the implementation that returns probabilities."""
        if self.hf.config._attn_implementation != "eager":
            self.hf.set_attn_implementation("eager")

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> Union[torch.Tensor, LMOutput]:
        """Logits, or an ``LMOutput`` when either flag is set (see ``MoETransformerLM.forward``)."""
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        if not (output_hidden_states or output_attentions):
            return out.logits
        attentions = out.attentions if output_attentions else None
        if output_attentions and len(attentions or ()) != self.hf.config.num_hidden_layers:
            raise ValueError(f"TransformersCausalLM: the model returned {len(attentions or ())} attention maps for "
                             f"{self.hf.config.num_hidden_layers} layers; its attention implementation "
                             f"({self.hf.config._attn_implementation!r}) must be 'eager'")
        return LMOutput(logits=out.logits, hidden_states=out.hidden_states if output_hidden_states else None,
                        attentions=attentions)


@dataclass(frozen=True)
class LMShape:
    n_layers: int
    hidden_size: int
    vocab_size: int


def lm_shape(model: nn.Module) -> LMShape:
    """Blocks, width and vocabulary of an adapted model."""
    if isinstance(model, MoETransformerLM):
        cfg = model.config
        return LMShape(cfg.n_layers, cfg.hidden_size, cfg.vocab_size)
    cfg = model.hf.config
    return LMShape(cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """Our causal attention has no padding mask: padding is exact only at the end of a row."""
    mask = attention_mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("distill: MoETransformerLM takes right-padded attention masks only (ones, then zeros); "
                         "a real token after a padded one would attend to the padding")


def lm_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               output_hidden_states: bool = False, output_attentions: bool = False) -> LMOutput:
    """An ``LMOutput`` of an adapted model (hidden states and attentions only when asked)."""
    flags = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
    if isinstance(model, MoETransformerLM):
        if attention_mask is not None:
            check_right_padded(attention_mask)
        out = model(input_ids, **flags)
    else:
        out = model(input_ids, attention_mask=attention_mask, **flags)
    return out if isinstance(out, LMOutput) else LMOutput(logits=out)


def adapt(model: nn.Module) -> nn.Module:
    """Our model as is; a transformers ``PreTrainedModel`` wrapped in ``TransformersCausalLM``."""
    if isinstance(model, (MoETransformerLM, TransformersCausalLM)):
        return model
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return TransformersCausalLM(model)
    raise TypeError(f"distill: cannot use a {type(model).__name__}; pass an MoETransformerLM, a transformers "
                    f"causal LM or a folder holding one")


def load_lm(source: Union[str, Path, nn.Module], parallel: ParallelState, device: torch.device,
            dtype: torch.dtype, as_teacher: bool = False) -> nn.Module:
    """An adapted model on ``device`` with parameters in ``dtype`` (see the module docstring).

    ``as_teacher``: our MoE layers are loaded with ``eval_capacity_factor=None``
    so that the teacher (in eval mode) drops no token.
    """
    if isinstance(source, nn.Module):
        model = adapt(source)
        if isinstance(model, MoETransformerLM) and model.parallel.ep_size != parallel.ep_size:
            raise ValueError(f"distill: a model built at ep_size={model.parallel.ep_size} was passed to a run at "
                             f"ep_size={parallel.ep_size}; build it with the run's ParallelState")
    elif (Path(source) / "config.json").is_file():
        model = TransformersCausalLM(load_causal_lm(source, dtype=dtype))
    else:
        model = load_lm_checkpoint(Path(source), parallel, no_eval_dropping=as_teacher)
    dropping = [layer for layer in moe_layers(model) if layer.config.eval_capacity_factor is not None]
    if as_teacher and dropping:
        raise ValueError(f"distill: the teacher's MoE layers have eval_capacity_factor="
                         f"{dropping[0].config.eval_capacity_factor} and would drop tokens; build it with "
                         f"eval_capacity_factor=None (load_lm does so for a checkpoint folder)")
    model = model.to(device)
    for param in model.parameters():  # buffers (RoPE tables, MoE load counts, V3 bias) keep their precision
        param.data = param.data.to(dtype)
    return model

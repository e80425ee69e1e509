"""Expert parallelism for a whole transformers DeepSeek model in one call, and the way back.

    parallel = moe_ep.init_expert_parallel(ep_size=4)
    model = load_causal_lm(folder, parallel, seq_balance_coef=1e-4)  # from_pretrained + expert_parallelize
    loss = model(input_ids, labels=labels).loss + total_aux_loss(model)
    loss.backward(); sync_gradients(model, parallel); optimizer.step(); update_moe_bias(model)
    save_pretrained(model, "out/")         # collective; rank 0 writes a folder from_pretrained reads

``expert_parallelize`` swaps every ``DeepseekV2Moe`` / ``DeepseekV3MoE`` of
the model for an ``ExpertParallelMoE`` holding an ``MoELayer`` built on
``parallel`` (``interop.from_hf_moe``): same call (``hidden_states [B, S, H]``
in, a tensor of the same shape out, as the decoder layers of transformers 5.x
expect), same routing, only this rank's experts. Everything else (attention,
norms, embeddings, dense MLPs, ``generate``, ``labels`` loss) is the model's
own code. ``moe_ep.model_moe`` collects the auxiliary losses, statistics and
V3 bias updates; ``gradients.sync_gradients`` and the DeepSpeed wrapper
find the layers' experts as in ``MoETransformerLM``.

Under expert parallelism every forward is collective (all-to-all per MoE
layer): every rank of an EP group runs the same number of forwards, with
generation too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .config import hf_config_fields
from .interop import from_hf_moe, hf_moe_config, to_hf_state_dict
from .layer import MoELayer
from .model_moe import child_slots, moe_layers
from .parallel.state import ParallelState

__all__ = ["ExpertParallelMoE", "HF_MOE_BLOCK_NAMES", "expert_parallelize", "hf_state_dict", "load_causal_lm",
           "save_pretrained"]

# transformers 5.x names, and the Hub remote-code spelling of V2 (its layout is refused with a clear error).
HF_MOE_BLOCK_NAMES = ("DeepseekV2Moe", "DeepseekV2MoE", "DeepseekV3MoE")


class ExpertParallelMoE(nn.Module):
    """Stands in for a transformers DeepSeek MoE block: ``forward(hidden_states) -> tensor``, like the block.

    ``moe``: the ``MoELayer`` (this rank's experts; a ``DeepSpeedMoE`` holding
    it after ``wrap_moe_layers``). ``replaces``: the class name of the block.
    """

    def __init__(self, moe: MoELayer, replaces: str):
        super().__init__()
        self.moe = moe
        self.replaces = replaces

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden_states)

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}"


def _check_call_contract(block: nn.Module, hidden_size: int) -> None:
    """The block maps ``[1, 1, H]`` to a tensor of the same shape, as ``ExpertParallelMoE`` does."""
    probe = torch.zeros(1, 1, hidden_size, dtype=block.experts.gate_up_proj.dtype, device=block.gate.weight.device)
    with torch.no_grad():
        out = block(probe)
    if not torch.is_tensor(out) or out.shape != (1, 1, hidden_size):
        import transformers

        got = type(out).__name__ if not torch.is_tensor(out) else f"a tensor of shape {tuple(out.shape)}"
        raise ValueError(f"expert_parallelize: {type(block).__name__}.forward of transformers "
                         f"{transformers.__version__} returns {got} for hidden states [1, 1, {hidden_size}]; "
                         f"moe_ep replaces blocks that return one tensor of the input's shape (transformers 5.x)")


def expert_parallelize(model: nn.Module, parallel: ParallelState, **overrides: Any) -> nn.Module:
    """Replace every DeepSeek MoE block of a transformers model, in place, by an expert-parallel one.

    ``model``: a ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM`` (or any
    transformers model holding ``DeepseekV2Moe`` / ``DeepseekV3MoE`` blocks
    and a ``config``). ``parallel``: from ``init_expert_parallel`` or
    ``deepspeed_parallel_state``; every rank calls this with the same model.
    ``overrides``: ``MoEConfig`` fields transformers has no field for
    (balance coefficients, capacities and drop policy, ``bias_update_rate``,
    ``router_dtype``, ``expert_backend``...); fields the transformers config
    determines (``hf_config_fields``) are refused, so the model saved back
    routes as it was trained.

    Every block is checked before any is replaced (layout, call contract,
    expert count divisible by ``parallel.ep_size``); then each is converted
    in turn (``from_hf_moe``: only this rank's experts are copied) and
    dropped, so at most one block's full weights exist beside the model.
    Returns ``model``.
    """
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise ValueError(f"expert_parallelize: {type(model).__name__} has no transformers config (.config)")
    slots = child_slots(model, lambda child: type(child).__name__ in HF_MOE_BLOCK_NAMES)
    if not slots:
        raise ValueError(f"expert_parallelize: {type(model).__name__} has no DeepSeek MoE block "
                         f"({' / '.join(HF_MOE_BLOCK_NAMES)}); nothing to make expert-parallel")
    mapped = hf_config_fields(hf_config)
    from_transformers = sorted(set(overrides) & set(mapped))
    if from_transformers:
        raise ValueError(f"expert_parallelize: {from_transformers} come from the transformers config; change "
                         f"model.config instead, so a saved model routes as it was trained")
    n_experts = mapped["n_routed_experts"]
    if n_experts % parallel.ep_size:
        raise ValueError(f"expert_parallelize: the model's {n_experts} routed experts are not divisible by "
                         f"ep_size={parallel.ep_size}")
    for parent, name in slots:
        hf_moe_config(getattr(parent, name), hf_config, **overrides)
    _check_call_contract(getattr(*slots[0]), mapped["hidden_size"])
    for parent, name in slots:
        block = getattr(parent, name)
        layer = from_hf_moe(block, hf_config, parallel, **overrides).train(block.training)
        setattr(parent, name, ExpertParallelMoE(layer, type(block).__name__))
        del block
    return model


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of the transformers model ``expert_parallelize`` was given, at the current weights.

    Every key and shape of the original model's ``state_dict()``: the
    replaced blocks' weights come from ``interop.to_hf_state_dict``
    (experts gathered over the EP group), every other tensor is the model's
    own. Collective when experts are sharded: every rank calls it, and every
    rank gets the whole dict.
    """
    blocks = {name: module for name, module in model.named_modules() if isinstance(module, ExpertParallelMoE)}
    if not blocks:
        raise ValueError(f"hf_state_dict: {type(model).__name__} has no ExpertParallelMoE block; "
                         f"call expert_parallelize first")
    out = {key: tensor for key, tensor in model.state_dict().items()
           if not any(key.startswith(prefix + ".") for prefix in blocks)}
    for prefix, block in blocks.items():
        (layer,) = moe_layers(block)
        out.update({f"{prefix}.{key}": tensor for key, tensor in to_hf_state_dict(layer).items()})
    return out


def load_causal_lm(folder: Union[str, Path], parallel: Optional[ParallelState] = None,
                   dtype: torch.dtype = torch.float32, **overrides: Any) -> nn.Module:
    """A transformers causal LM from a local ``save_pretrained`` folder (nothing is downloaded), KV cache off.

    ``parallel``: made expert-parallel on it (``expert_parallelize`` with the
    ``MoEConfig`` ``overrides``), on the CPU, so only this rank's experts are
    kept; None: the model as transformers builds it (replicated, its MoE
    blocks its own). Parameters in ``dtype``. The caller moves it to its device.
    """
    from transformers import AutoModelForCausalLM

    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"load_causal_lm: {folder} has no config.json (expected a folder written by save_pretrained)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.config.use_cache = False
    return expert_parallelize(model, parallel, **overrides) if parallel is not None else model


def save_pretrained(model: nn.Module, folder: Union[str, Path], tokenizer: Any = None, **kwargs: Any) -> Path:
    """Write a transformers model (and ``tokenizer``) to ``folder`` that ``from_pretrained`` reads on one process.

    A model made expert-parallel by ``expert_parallelize`` is written with
    ``hf_state_dict`` (experts gathered over the EP group: every key of the
    original model); any other as it is. Collective when a process group
    exists: every rank calls it, rank 0 writes, the others wait at a barrier.
    moe_ep-only settings (the ``overrides`` of ``expert_parallelize``) are not
    part of a transformers config and are not saved.
    """
    parallel_blocks = any(isinstance(m, ExpertParallelMoE) for m in model.modules())
    state = hf_state_dict(model) if parallel_blocks else None
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.save_pretrained(folder, state_dict=state, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    if dist.is_initialized():
        dist.barrier()
    return Path(folder)

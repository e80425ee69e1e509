"""Conversions between moe_ep checkpoints and DeepSpeed's or transformers' layouts (weights and buffers).

``to_deepspeed(src, dst, tag)`` writes what ``engine.save_checkpoint`` of
launch/ds_train.py writes for the model (``moe_ep/integrations/deepspeed.py``
describes the wrapped layout)::

    DST/latest                                          the tag
    DST/TAG/mp_rank_00_model_states.pt                  "module": every non-expert tensor (wrapped names:
                                                        layers.<i>.ffn.moe.router.weight, ...ffn.moe.shared_mlp.*),
                                                        global_steps, num_experts, and ds_train's client
                                                        state (data, train_config, model_config)
    DST/TAG/layer_<L>_expert_<e>_mp_rank_00_model_states.pt
                                                        MoE layer L (0-based among MoE layers), global expert e:
                                                        {layers.<i>.ffn.deepspeed_moe.experts.deepspeed_experts.<e>.w_in: [H, 2I],
                                                         ....w_out: [I, H]}

``engine.load_checkpoint(DST, load_module_only=True)`` loads them at any
EP size. Optimizer state is not converted (DeepSpeed keeps it in ZeRO's
flat partitions). ``from_deepspeed(src, dst)`` reads such a folder (ours or
one the engine wrote) back into a weights-only moe_ep checkpoint.

``to_hf(src, dst)`` writes a safetensors file with each MoE block under the
keys of a transformers DeepSeek MoE block (``moe_ep.interop.to_hf_state_dict``)
prefixed ``model.layers.<i>.mlp.``, as in ``DeepseekV2ForCausalLM``. Only the
MoE blocks are written: attention (moe_ep's is multi-head, DeepSeek's is
MLA), norms and embeddings have no DeepSeek counterpart to load into.

Every file is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ..layer import MoELayer
from ..models import ModelConfig, MoETransformerLM
from ..parallel.state import ParallelState
from .manifest import CheckpointError, read_manifest
from .save_load import load_model, write_checkpoint

MAIN_FILE = "mp_rank_00_model_states.pt"
_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


def _moe_blocks(model: MoETransformerLM) -> list[tuple[int, MoELayer]]:
    return [(i, block.ffn) for i, block in enumerate(model.layers) if isinstance(block.ffn, MoELayer)]


def _read(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read it with torch.load(weights_only=True) "
                              f"({type(exc).__name__}: {exc})") from exc


# ------------------------------------------------------------------ DeepSpeed
def to_deepspeed(src: Path, dst: Path, tag: Optional[str] = None) -> Path:
    """Write the moe_ep checkpoint ``src`` as DeepSpeed MoE checkpoint files under ``dst/tag``; returns that folder."""
    from ..integrations.deepspeed import DeepSpeedMoE, wrap_moe_layers

    manifest = read_manifest(src)
    model = load_model(src)
    wrap_moe_layers(model)
    tag = tag or Path(src).name
    folder = Path(dst) / tag
    folder.mkdir(parents=True, exist_ok=True)
    module_state = {}
    moe_id = 0
    for name, module in model.named_modules():
        if isinstance(module, DeepSpeedMoE):
            per_expert: dict[int, dict] = {}
            for key, tensor in module.state_dict().items():
                if "expert" in key:  # DeepSpeed's rule: every key containing "expert" is a routed expert
                    expert = int(re.search(r"deepspeed_experts\.(\d+)\.", key).group(1))
                    per_expert.setdefault(expert, {})[f"{name}.{key}"] = tensor.clone()
            for expert, state in per_expert.items():
                torch.save(state, folder / f"layer_{moe_id}_expert_{expert}_{MAIN_FILE}")
            moe_id += 1
    for key, tensor in model.state_dict().items():
        if "expert" not in key:
            module_state[key] = tensor
    main = dict(module=module_state, buffer_names=[n for n, _ in model.named_buffers()
                                                   if n in module_state],
                optimizer=None, lr_scheduler=None, skipped_steps=0, global_steps=manifest["step"],
                dp_world_size=1, mp_world_size=1, num_experts=[model.config.moe.n_routed_experts] * moe_id,
                model_config=manifest["model_config"], train_config=manifest.get("train_config"),
                data=manifest.get("data"))
    torch.save(main, folder / MAIN_FILE)
    (Path(dst) / "latest").write_text(tag)
    return folder


def from_deepspeed(src: Path, dst: Path, tag: Optional[str] = None, model_config: Optional[dict] = None) -> Path:
    """A weights-only moe_ep checkpoint in ``dst`` from the DeepSpeed checkpoint ``src`` (tag: ``src/latest``).

    ``model_config`` (a ``ModelConfig.to_dict()``) defaults to the one
    launch/ds_train.py stores in the checkpoint's client state.
    """
    from ..integrations.deepspeed import unwrap_moe_layers, wrap_moe_layers

    src = Path(src)
    if tag is None:
        if not (src / "latest").is_file():
            raise CheckpointError(f"{src / 'latest'}: missing; pass the tag")
        tag = (src / "latest").read_text().strip()
    folder = src / tag
    main = _read(folder / MAIN_FILE)
    config = model_config or main.get("model_config")
    if config is None:
        raise CheckpointError(f"{folder / MAIN_FILE}: holds no model_config (not written by launch/ds_train.py); "
                              f"pass the model config")
    state = dict(main["module"])
    expert_files = sorted(p for p in folder.iterdir() if _EXPERT_FILE.search(p.name))
    if not expert_files:
        raise CheckpointError(f"{folder}: no layer_*_expert_*_{MAIN_FILE} files")
    for path in expert_files:
        state.update(_read(path))
    model = MoETransformerLM(ModelConfig.from_dict(config))
    wrap_moe_layers(model)  # at one process local expert ids are the global ids of the files
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder}: its tensors do not fit the model config: {exc}") from exc
    unwrap_moe_layers(model)
    fields = dict(step=int(main.get("global_steps", 0)), train_config=main.get("train_config"), data=main.get("data"))
    return write_checkpoint(Path(dst), model, ParallelState(), fields)


# --------------------------------------------------------------- transformers
def to_hf(src: Path, dst: Path) -> list[str]:
    """Write the MoE blocks of ``src`` in transformers' DeepSeek layout to the safetensors file ``dst``; returns the keys."""
    from safetensors.torch import save_file

    model = load_model(src)
    tensors = {}
    for index, layer in _moe_blocks(model):
        for key, tensor in to_hf_state_dict_checked(layer, index).items():
            tensors[f"model.layers.{index}.mlp.{key}"] = tensor.contiguous()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=dict(format="pt", source=str(src)))
    return sorted(tensors)


def to_hf_state_dict_checked(layer: MoELayer, index: int) -> dict:
    from ..interop import to_hf_state_dict

    try:
        return to_hf_state_dict(layer)
    except ValueError as exc:
        raise CheckpointError(f"block {index}: {exc}") from exc

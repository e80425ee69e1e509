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

Every file is read with ``torch.load(weights_only=True)``. A tag (``--tag``
or DeepSpeed's ``latest``) must be a plain folder name: absolute names,
``..`` and path separators are refused. Missing fields (``module``,
``global_steps``, the model config's) raise ``CheckpointError`` naming them.

No conversion replaces an existing non-empty target unless ``overwrite``
(``--overwrite``) is given, and then only one of its kind: a folder holding
a moe_ep checkpoint (valid manifest, nothing but checkpoint files), a tag
folder holding nothing but DeepSpeed model-state files, a file (``to_hf``).
Nothing else is ever removed (``folders.clear_folder``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.folders import clear_folder, is_empty
from ..checkpoint.manifest import CheckpointError, check_name, read_manifest
from ..checkpoint.save_load import write_checkpoint
from ..layer import MoELayer
from ..models import MoETransformerLM
from ..parallel.state import ParallelState
from .checkpoints import load_model, model_config_from

MAIN_FILE = "mp_rank_00_model_states.pt"
_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


def _moe_blocks(model: MoETransformerLM) -> list[tuple[int, MoELayer]]:
    return [(int(i), block.ffn) for i, block in model.layers.items() if isinstance(block.ffn, MoELayer)]


def _read(path: Path) -> dict:
    """The dict saved in ``path`` (``torch.load(weights_only=True)``); ``CheckpointError`` naming the file."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read it with torch.load(weights_only=True) "
                              f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a dict of DeepSpeed model state")
    return loaded


def _is_deepspeed_file(name: str) -> bool:
    return name == MAIN_FILE or bool(_EXPERT_FILE.match(name))


def _refuse_to_replace(target: Path, overwrite: bool, kind: str) -> None:
    """``CheckpointError`` unless ``target`` is absent or empty, or ``overwrite`` asks to replace it."""
    if not is_empty(target) and not overwrite:
        raise CheckpointError(f"{target}: exists and is not empty; pass --overwrite (overwrite=True) to replace "
                              f"the {kind} there")


# ------------------------------------------------------------------ DeepSpeed
def to_deepspeed(src: Path, dst: Path, tag: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write the moe_ep checkpoint ``src`` as DeepSpeed MoE checkpoint files under ``dst/tag``; returns that folder.

    An existing non-empty ``dst/tag`` is replaced only with ``overwrite`` and
    when it holds nothing but DeepSpeed model-state files.
    """
    tag = check_name(tag or Path(src).name, "tag (default: the source folder's name)")
    folder = Path(dst) / tag
    _refuse_to_replace(folder, overwrite, "DeepSpeed checkpoint")
    from ..integrations.deepspeed import DeepSpeedMoE, wrap_moe_layers  # imports deepspeed: after the checks

    manifest = read_manifest(src)
    model = load_model(src)
    wrap_moe_layers(model)
    clear_folder(folder, _is_deepspeed_file, "DeepSpeed model checkpoint")
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


def _latest_tag(src: Path) -> str:
    """The tag named by DeepSpeed's ``src/latest``: a plain folder name, else ``CheckpointError``."""
    path = src / "latest"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; pass the tag")
    try:
        return check_name(path.read_text().strip(), str(path))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not text ({exc})") from exc


def _refuse_to_replace_checkpoint(dst: Path, overwrite: bool) -> None:
    """An existing non-empty ``dst`` must be a moe_ep checkpoint, and ``overwrite`` must ask to replace it."""
    if is_empty(dst):
        return
    try:
        read_manifest(dst)
    except CheckpointError as exc:
        raise CheckpointError(f"{dst}: exists, is not empty and is not a moe_ep checkpoint ({exc}); refusing to "
                              f"replace it") from exc
    _refuse_to_replace(dst, overwrite, "moe_ep checkpoint")


def from_deepspeed(src: Path, dst: Path, tag: Optional[str] = None, model_config: Optional[dict] = None,
                   overwrite: bool = False) -> Path:
    """A weights-only moe_ep checkpoint in ``dst`` from the DeepSpeed checkpoint ``src`` (tag: ``src/latest``).

    ``model_config`` (a ``ModelConfig.to_dict()``) defaults to the one
    launch/ds_train.py stores in the checkpoint's client state. An existing
    non-empty ``dst`` is replaced only when it is a moe_ep checkpoint and
    ``overwrite`` is given.
    """
    src, dst = Path(src), Path(dst)
    _refuse_to_replace_checkpoint(dst, overwrite)
    folder = src / (check_name(tag, "tag") if tag is not None else _latest_tag(src))
    main_path = folder / MAIN_FILE
    main = _read(main_path)
    config = model_config or main.get("model_config")
    if config is None:
        raise CheckpointError(f"{main_path}: holds no model_config (not written by launch/ds_train.py); "
                              f"pass the model config")
    if not isinstance(main.get("module"), dict):
        raise CheckpointError(f"{main_path}: field module is missing or not a dict of tensors")
    steps = main.get("global_steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise CheckpointError(f"{main_path}: field global_steps is missing or not a non-negative int ({steps!r})")
    for field in ("train_config", "data"):
        if not isinstance(main.get(field), (dict, type(None))):
            raise CheckpointError(f"{main_path}: field {field} is not a dict")
    config = model_config_from(config, "model_config (argument)" if model_config else f"{main_path}: client state")
    state = dict(main["module"])
    expert_files = sorted(p for p in folder.iterdir() if _EXPERT_FILE.search(p.name))
    if not expert_files:
        raise CheckpointError(f"{folder}: no layer_*_expert_*_{MAIN_FILE} files")
    for path in expert_files:
        state.update(_read(path))
    model = MoETransformerLM(config)
    from ..integrations.deepspeed import unwrap_moe_layers, wrap_moe_layers  # imports deepspeed: after the checks

    wrap_moe_layers(model)  # at one process local expert ids are the global ids of the files
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder}: its tensors do not fit the model config: {exc}") from exc
    unwrap_moe_layers(model)
    fields = dict(step=steps, train_config=main.get("train_config"), data=main.get("data"))
    return write_checkpoint(dst, model, ParallelState(), fields)


# --------------------------------------------------------------- transformers
def to_hf(src: Path, dst: Path, overwrite: bool = False) -> list[str]:
    """Write the MoE blocks of ``src`` in transformers' DeepSeek layout to the safetensors file ``dst``; returns the keys.

    An existing ``dst`` is replaced only with ``overwrite``, and only when it is a file.
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.exists() and (dst.is_dir() or not overwrite):
        raise CheckpointError(f"{dst}: exists; " + ("it is a folder, not a .safetensors file" if dst.is_dir() else
                                                     "pass --overwrite (overwrite=True) to replace it"))
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

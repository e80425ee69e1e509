"""Weight conversion between transformers' DeepSeek MoE blocks and ``MoELayer``.

Layout mapping (E routed experts, H hidden, I expert width, W = N_s * I):

    transformers (DeepseekV2Moe / DeepseekV3MoE)     moe_ep.MoELayer
    gate.weight                  [E, H]             router.weight            [E, H]   (router dtype, fp32)
    gate.e_score_correction_bias [E]     (V3)       router.e_score_correction_bias [E] (fp32 buffer)
    experts.gate_up_proj         [E, 2I, H]         experts.w_in   [E, H, 2I] = gate_up_proj.transpose(1, 2)
    experts.down_proj            [E, H, I]          experts.w_out  [E, I, H]  = down_proj.transpose(1, 2)
    shared_experts.gate_proj.weight [W, H]          shared_experts.gate_proj.weight  (same)
    shared_experts.up_proj.weight   [W, H]          shared_experts.up_proj.weight    (same)
    shared_experts.down_proj.weight [H, W]          shared_experts.down_proj.weight  (same)

transformers stores projections as ``[out, in]`` (``F.linear``); moe_ep stores
``[E, in, out]`` so a projection is ``x @ w[e]``. Both keep the gate half
before the up half (``gate, up = h.chunk(2)``), so the transpose is the whole
conversion. Neither block adds the residual. ``MoELayer.drop_step`` (the
rotation of protected sequences) has no transformers counterpart.

An expert-parallel layer holds rows ``[first, last)`` of the expert stacks
(``ParallelState.expert_range``): ``from_hf_moe(..., parallel=state)`` copies
only those rows, ``to_hf_state_dict`` gathers them back.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .config import MoEConfig
from .layer import MoELayer
from .parallel.state import ParallelState

__all__ = ["from_hf_moe", "hf_block_layout", "hf_moe_config", "to_hf_keys", "to_hf_state_dict"]


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} from the config, got {tuple(tensor.shape)}")


def hf_block_layout(config: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the ``state_dict()`` of the transformers 5.x block matching ``config``."""
    E, H, I, W = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, config.shared_width
    layout = {"gate.weight": (E, H), "experts.gate_up_proj": (E, 2 * I, H), "experts.down_proj": (E, H, I),
              "shared_experts.gate_proj.weight": (W, H), "shared_experts.up_proj.weight": (W, H),
              "shared_experts.down_proj.weight": (H, W)}
    if config.aux_free_bias:
        layout["gate.e_score_correction_bias"] = (E,)
    return layout


def _check_layout(block: torch.nn.Module, config: MoEConfig) -> None:
    """Raise unless the block's ``state_dict()`` has exactly the keys and shapes of ``hf_block_layout``."""
    import transformers

    state = block.state_dict()
    expected = hf_block_layout(config)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:  # e.g. transformers 4.x: one Linear per expert; mlp_bias=True: biases
        raise ValueError(f"from_hf_moe: {type(block).__name__} (transformers {transformers.__version__}) does not "
                         f"have the layout moe_ep converts (transformers 5.x DeepseekV2Moe / DeepseekV3MoE, "
                         f"see moe_ep/interop.py): missing {missing}, unexpected {unexpected}")
    for key, shape in expected.items():
        _check_shape(key, state[key], shape)


def hf_moe_config(hf_moe_module: torch.nn.Module, hf_config: Any, **overrides: Any) -> MoEConfig:
    """The ``MoEConfig`` that routes like ``hf_moe_module``, after checking the block's layout.

    ``MoEConfig.from_hf_config(hf_config, **overrides)`` (V3:
    ``group_score_topk=2``, as transformers); transformers' V2 router never
    renormalises the top-k weights, so ``norm_topk_prob`` is forced to False
    for a V2 block (unless overridden). Raises ``ValueError`` naming the key
    when the block's tensors differ from the transformers 5.x layout of its
    config (names or shapes).
    """
    if getattr(hf_moe_module, "gate", None) is None or getattr(hf_moe_module, "experts", None) is None:
        raise ValueError(f"from_hf_moe: {type(hf_moe_module).__name__} has no gate/experts; "
                         f"expected a DeepseekV2Moe or DeepseekV3MoE block")
    if not hasattr(hf_moe_module.gate, "e_score_correction_bias") and "norm_topk_prob" not in overrides:
        overrides["norm_topk_prob"] = False
    config = MoEConfig.from_hf_config(hf_config, **overrides)
    if config.activation != "swiglu":
        raise ValueError("from_hf_moe: transformers DeepSeek experts are SwiGLU; activation must be 'swiglu'")
    _check_layout(hf_moe_module, config)
    return config


def from_hf_moe(hf_moe_module: torch.nn.Module, hf_config: Any, parallel: Optional[ParallelState] = None,
                **overrides: Any) -> MoELayer:
    """An ``MoELayer`` with the weights of a transformers DeepSeek MoE block.

    ``hf_moe_module`` is a ``DeepseekV2Moe`` or ``DeepseekV3MoE`` (transformers
    5.x layout, see the module docstring); ``hf_config`` its
    ``DeepseekV2Config`` / ``DeepseekV3Config``; the layer's config is
    ``hf_moe_config(hf_moe_module, hf_config, **overrides)``, so it routes
    exactly like the block.

    ``parallel``: the layer is built on it and keeps only this rank's experts
    (every rank must call this, in the same order). The layer lives on the
    block's device; routed and shared expert weights keep the block's dtype,
    the router weight and the bias stay in the router dtype (fp32 by
    default).
    """
    config = hf_moe_config(hf_moe_module, hf_config, **overrides)
    state = hf_moe_module.state_dict()
    gate_up = state["experts.gate_up_proj"]
    with torch.device(gate_up.device):
        layer = MoELayer(config, parallel)
    ids = layer.local_expert_ids()  # this rank's slots (its expert range, or its placement's experts)
    with torch.no_grad():
        layer.router.weight.copy_(state["gate.weight"].to(layer.router.weight.dtype))
        if config.aux_free_bias:
            layer.router.e_score_correction_bias.copy_(state["gate.e_score_correction_bias"].float())
        layer.experts.to(gate_up.dtype)
        layer.experts.w_in.copy_(gate_up[ids].transpose(1, 2))
        layer.experts.w_out.copy_(state["experts.down_proj"][ids].transpose(1, 2))
        if layer.shared_experts is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                src = state[f"shared_experts.{name}.weight"]
                dst = getattr(layer.shared_experts, name)
                dst.to(src.dtype)
                dst.weight.copy_(src)
    return layer


def to_hf_keys(state: dict[str, torch.Tensor], config: MoEConfig) -> dict[str, torch.Tensor]:
    """An unsharded ``MoELayer`` state dict (or gradients under its parameter names) under transformers' keys.

    Keys of ``hf_block_layout(config)``; moe_ep-only entries (``drop_step``)
    are left out. A layer without shared experts yields empty ``[0, H]`` /
    ``[H, 0]`` shared weights (transformers builds the shared MLP with width
    ``moe_intermediate_size * n_shared_experts`` = 0).
    """
    if config.activation != "swiglu":
        raise ValueError("to_hf_state_dict: transformers DeepSeek experts are SwiGLU; the layer uses "
                         f"activation={config.activation!r}")
    if config.n_shared_experts and config.shared_intermediate_size not in (None, config.moe_intermediate_size):
        raise ValueError("to_hf_state_dict: transformers' shared MLP width is n_shared_experts * "
                         "moe_intermediate_size; the layer sets a different shared_intermediate_size")
    E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    _check_shape("experts.w_in", state["experts.w_in"], (E, H, 2 * I))
    _check_shape("experts.w_out", state["experts.w_out"], (E, I, H))
    out = {
        "gate.weight": state["router.weight"].float(),
        "experts.gate_up_proj": state["experts.w_in"].transpose(1, 2).contiguous(),
        "experts.down_proj": state["experts.w_out"].transpose(1, 2).contiguous(),
    }
    if config.aux_free_bias and "router.e_score_correction_bias" in state:
        out["gate.e_score_correction_bias"] = state["router.e_score_correction_bias"].float()
    if config.n_shared_experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"shared_experts.{name}.weight"] = state[f"shared_experts.{name}.weight"]
    else:
        dtype = out["experts.gate_up_proj"].dtype
        out["shared_experts.gate_proj.weight"] = torch.zeros(0, H, dtype=dtype)
        out["shared_experts.up_proj.weight"] = torch.zeros(0, H, dtype=dtype)
        out["shared_experts.down_proj.weight"] = torch.zeros(H, 0, dtype=dtype)
    return out


def to_hf_state_dict(layer: MoELayer) -> dict[str, torch.Tensor]:
    """The layer's weights under the keys of a transformers DeepSeek MoE block's ``state_dict()``.

    ``hf_module.load_state_dict(to_hf_state_dict(layer))`` works for a block
    built from the matching config (see ``to_hf_keys``).
    ``gate.e_score_correction_bias`` is present only for a layer with
    ``aux_free_bias`` (V3). For an expert-parallel layer this gathers the
    experts (a collective over the EP group: every EP rank must call it).
    """
    state = layer.full_state_dict() if layer.parallel.ep_size > 1 else \
        {k: v.detach().clone() for k, v in layer.state_dict().items()}
    return to_hf_keys(state, layer.config)

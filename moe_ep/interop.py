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
conversion. Neither block adds the residual.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from .config import MoEConfig
from .layer import MoELayer

__all__ = ["from_hf_moe", "to_hf_state_dict"]


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} from the config, got {tuple(tensor.shape)}")


def _hf_tensor(module: torch.nn.Module, dotted: str) -> torch.Tensor:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"from_hf_moe: {type(module).__name__} has no {dotted!r}")
    if not torch.is_tensor(obj):
        raise ValueError(f"from_hf_moe: {dotted!r} of {type(module).__name__} is not a tensor")
    return obj


def from_hf_moe(hf_moe_module: torch.nn.Module, hf_config: Any, **overrides: Any) -> MoELayer:
    """A single-process ``MoELayer`` with the weights of a transformers DeepSeek MoE block.

    ``hf_moe_module`` is a ``DeepseekV2Moe`` or ``DeepseekV3MoE`` (transformers
    5.x layout, see the module docstring); ``hf_config`` its
    ``DeepseekV2Config`` / ``DeepseekV3Config``. The config comes from
    ``MoEConfig.from_hf_config(hf_config, **overrides)``. Two adjustments keep
    the outputs equal to the transformers block:

    * transformers' V2 router never renormalises the top-k weights, so
      ``norm_topk_prob`` is forced to False for a V2 block (unless overridden);
    * transformers' V3 router sums the top **2** biased scores per group
      (hard-coded, as in DeepSeek's code); moe_ep sums the top
      ``num_experts_per_tok // topk_group``. A warning is raised when the two
      differ (then the outputs may differ too).

    The routed and shared expert weights keep the block's dtype; the router
    weight and the bias stay in the router dtype (fp32 by default).

    Raises ``ValueError`` when a tensor's shape does not match the config.
    """
    gate = getattr(hf_moe_module, "gate", None)
    if gate is None or getattr(hf_moe_module, "experts", None) is None:
        raise ValueError(f"from_hf_moe: {type(hf_moe_module).__name__} has no gate/experts; "
                         f"expected a DeepseekV2Moe or DeepseekV3MoE block")
    is_v3 = hasattr(gate, "e_score_correction_bias")
    if not is_v3 and "norm_topk_prob" not in overrides:
        overrides["norm_topk_prob"] = False
    config = MoEConfig.from_hf_config(hf_config, **overrides)
    if config.activation != "swiglu":
        raise ValueError("from_hf_moe: transformers DeepSeek experts are SwiGLU; activation must be 'swiglu'")
    if config.topk_method == "node_limited" and config.n_group > 1 \
            and config.num_experts_per_tok // config.topk_group != 2:
        warnings.warn(f"from_hf_moe: transformers scores a group by its top-2 biased scores, moe_ep by its top "
                      f"num_experts_per_tok // topk_group = {config.num_experts_per_tok // config.topk_group}; "
                      f"routing may differ from the transformers block", stacklevel=2)

    E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    gate_w = _hf_tensor(hf_moe_module, "gate.weight")
    gate_up = _hf_tensor(hf_moe_module, "experts.gate_up_proj")
    down = _hf_tensor(hf_moe_module, "experts.down_proj")
    _check_shape("gate.weight", gate_w, (E, H))
    _check_shape("experts.gate_up_proj", gate_up, (E, 2 * I, H))
    _check_shape("experts.down_proj", down, (E, H, I))

    layer = MoELayer(config)
    expert_dtype = gate_up.dtype
    with torch.no_grad():
        layer.router.weight.copy_(gate_w.to(layer.router.weight.dtype))
        if config.aux_free_bias:
            bias = _hf_tensor(hf_moe_module, "gate.e_score_correction_bias")
            _check_shape("gate.e_score_correction_bias", bias, (E,))
            layer.router.e_score_correction_bias.copy_(bias.float())
        layer.experts.to(expert_dtype)
        layer.experts.w_in.copy_(gate_up.transpose(1, 2))
        layer.experts.w_out.copy_(down.transpose(1, 2))
        if layer.shared_experts is not None:
            W = config.shared_width
            for name, shape in (("gate_proj", (W, H)), ("up_proj", (W, H)), ("down_proj", (H, W))):
                src = _hf_tensor(hf_moe_module, f"shared_experts.{name}.weight")
                _check_shape(f"shared_experts.{name}.weight", src, shape)
                if getattr(getattr(hf_moe_module.shared_experts, name), "bias", None) is not None:
                    raise ValueError(f"from_hf_moe: shared_experts.{name} has a bias (mlp_bias=True); "
                                     f"moe_ep's shared experts have none")
                dst = getattr(layer.shared_experts, name)
                dst.to(src.dtype)
                dst.weight.copy_(src)
    return layer


def to_hf_state_dict(layer: MoELayer) -> dict[str, torch.Tensor]:
    """The layer's weights under the keys of a transformers DeepSeek MoE block's ``state_dict()``.

    ``hf_module.load_state_dict(to_hf_state_dict(layer))`` works for a block
    built from the matching config (see the module docstring for the
    mapping). ``gate.e_score_correction_bias`` is present only for a layer
    with ``aux_free_bias`` (V3). A layer without shared experts yields empty
    ``[0, H]`` / ``[H, 0]`` shared weights (transformers builds the shared MLP
    with width ``moe_intermediate_size * n_shared_experts`` = 0). For an
    expert-parallel layer this gathers the experts (a collective over the EP
    group).
    """
    cfg = layer.config
    if cfg.activation != "swiglu":
        raise ValueError("to_hf_state_dict: transformers DeepSeek experts are SwiGLU; the layer uses "
                         f"activation={cfg.activation!r}")
    if cfg.n_shared_experts and cfg.shared_intermediate_size not in (None, cfg.moe_intermediate_size):
        raise ValueError("to_hf_state_dict: transformers' shared MLP width is n_shared_experts * "
                         "moe_intermediate_size; the layer sets a different shared_intermediate_size")
    state = layer.full_state_dict() if layer.parallel.ep_size > 1 else \
        {k: v.detach().clone() for k, v in layer.state_dict().items()}
    E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    _check_shape("experts.w_in", state["experts.w_in"], (E, H, 2 * I))
    _check_shape("experts.w_out", state["experts.w_out"], (E, I, H))
    out = {
        "gate.weight": state["router.weight"].float(),
        "experts.gate_up_proj": state["experts.w_in"].transpose(1, 2).contiguous(),
        "experts.down_proj": state["experts.w_out"].transpose(1, 2).contiguous(),
    }
    if cfg.aux_free_bias:
        out["gate.e_score_correction_bias"] = state["router.e_score_correction_bias"].float()
    if layer.shared_experts is not None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"shared_experts.{name}.weight"] = state[f"shared_experts.{name}.weight"]
    else:
        dtype = out["experts.gate_up_proj"].dtype
        out["shared_experts.gate_proj.weight"] = torch.zeros(0, H, dtype=dtype)
        out["shared_experts.up_proj.weight"] = torch.zeros(0, H, dtype=dtype)
        out["shared_experts.down_proj.weight"] = torch.zeros(H, 0, dtype=dtype)
    return out

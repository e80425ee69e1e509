"""Upcycling: a dense ``MoETransformerLM`` made into an MoE one that computes the same function at step 0.

The dense model's FFN blocks are SwiGLU, ``FFN(x) = down(silu(gate x) * up x)``
with ``F`` intermediate neurons; an FFN is the sum of its neurons, so cut into
``m`` slices of ``I = F / m`` neurons (slice ``j``: rows ``[jI, (j+1)I)`` of
``gate`` and ``up``, the same columns of ``down``), ``FFN(x) = sum_j FFN_j(x)``
exactly. Every block from ``first_k_dense`` on becomes an ``MoELayer``; every
other weight (embedding, attention, norms, head, the first ``first_k_dense``
FFNs) is the dense model's.

**Coarse** (``segments=None``; sparse upcycling, Komatsuzaki et al. 2022):
every routed expert is a copy of the whole FFN (``I = F``), no shared
experts, gates normalised over the chosen K (``norm_topk_prob``), scale 1:
``y = sum_k g_k FFN(x) = FFN(x)`` since ``sum_k g_k = 1``, whatever the
router chose. The router starts from ``N(0, ROUTER_STD^2)`` weights.

**Fine** (``segments=m``; DeepSeekMoE's segmentation): experts are 1/m
slices. The ``N_s`` shared experts are slices ``0 .. N_s - 1`` (their fused
FFN is exactly the first ``N_s * I`` neurons); the other ``R = m - N_s``
slices are the routed ones, each copied ``c = E / R`` times: routed expert
``e`` is slice ``N_s + e mod R`` of copy ``e // R``. With ``K = k R``, gates
normalised and ``routed_scaling_factor = R``, the router rows of one copy
start equal (one ``N(0, ROUTER_STD^2)`` row per copy: the "virtual groups" of
He et al. 2024, "Upcycling Large Language Models into Mixture of Experts"):
the R experts of a copy then have the same score, the top-K takes k whole
copies, each slice's gate is ``s_v / (R sum_chosen s)`` and
``R * sum_v sum_slices g FFN_j = sum_{j >= N_s} FFN_j``, so
``y = shared + routed = FFN(x)``. The tie holds for the step-0 function
only: a slice's router gradient depends on its own output, so the rows of a
copy drift apart from the first update.

Coarse is fine with ``m = 1`` and no shared expert. Both require (and
``upcycled_config`` sets, refusing an override that contradicts it) a SwiGLU
expert of the slice width, normalised gates, the scale above and no
capacity (a dropped pair would remove part of the FFN); group-limited
routing must keep whole copies in one group. V3's selection bias starts at
0 and router jitter scales a token's input to every router row alike, so
neither changes the step-0 function.

What is preserved at step 0: the function (logits, hence every loss) up to
float round-off, at any expert-parallel layout. What is not: the balance
losses (their values depend on the random router, not on the dense model),
the optimizer state (a new run starts AdamW from zero), and expert
diversity (copies are equal; only the router tells them apart).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import MoEConfig
from ..layer import MoELayer
from ..parallel.state import ParallelState
from .config import ModelConfig
from .transformer import MoETransformerLM

ROUTER_STD = 0.02  # standard deviation of the upcycled routers' weights
DEFAULT_FIRST_K_DENSE = 1  # dense blocks kept, as in DeepSeek's models (a dense checkpoint does not say)


class UpcycleError(ValueError):
    """An upcycling that cannot compute the dense function at step 0.

    ``source`` names the input at fault: ``dense`` (the dense model),
    ``segments`` (m), ``first_k_dense``, or ``moe`` (an ``MoEConfig`` override).
    """

    def __init__(self, source: str, message: str):
        super().__init__(message)
        self.source = source


def _mode(segments: Optional[int]) -> str:
    return "coarse" if segments is None else f"fine (m = {segments})"


def upcycled_moe_config(base: MoEConfig, dense_width: int, segments: Optional[int], overrides: dict) -> MoEConfig:
    """``base`` with ``overrides``, then the fields the construction needs (module docstring).

    ``UpcycleError`` when an override contradicts one of those fields, the
    width ``F`` is not divisible by m, or E, K or the routing groups do not
    hold whole copies of the R routed slices.
    """
    m = 1 if segments is None else segments
    if m < 1 or dense_width % m:
        raise UpcycleError("segments", f"upcycling {_mode(segments)}: the dense FFN's {dense_width} neurons do not "
                                       f"split into m = {m} equal slices")
    needed = dict(moe_intermediate_size=dense_width // m, shared_intermediate_size=None, activation="swiglu",
                  norm_topk_prob=True, expert_capacity_factor=None, device_capacity_factor=None,
                  eval_capacity_factor=None)
    if segments is None:
        needed["n_shared_experts"] = 0
    n_shared = needed.get("n_shared_experts", overrides.get("n_shared_experts", base.n_shared_experts))
    routed = m - n_shared
    if routed < 1:
        raise UpcycleError("moe", f"MoEConfig.n_shared_experts={n_shared}: upcycling {_mode(segments)} needs fewer "
                                  f"shared experts than the m = {m} slices, to leave some to route")
    needed["routed_scaling_factor"] = float(routed)
    for name, value in needed.items():
        if name in overrides and overrides[name] != value:
            raise UpcycleError("moe", f"MoEConfig.{name}={overrides[name]!r}: upcycling {_mode(segments)} needs "
                                      f"{value!r} for the MoE model to compute the dense function at step 0")
    config = base.replace(**{**overrides, **needed})
    multiples = dict(n_routed_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok)
    if config.topk_method != "greedy":  # a routing group must hold whole copies
        multiples["n_routed_experts / n_group"] = config.n_routed_experts // config.n_group
    for name, count in multiples.items():
        if count % routed:
            raise UpcycleError("moe", f"MoEConfig.{name} = {count}: upcycling {_mode(segments)} routes whole copies "
                                      f"of the R = m - n_shared_experts = {routed} routed slices, so it must be a "
                                      f"multiple of {routed}")
    return config


def upcycled_config(dense: ModelConfig, segments: Optional[int] = None, first_k_dense: Optional[int] = None,
                    moe_overrides: Optional[dict] = None) -> ModelConfig:
    """The MoE model's config: ``dense``'s, with blocks ``first_k_dense`` (None: 1) on made MoE.

    ``segments``: None for coarse, m for fine; ``moe_overrides``: ``MoEConfig``
    fields set over ``dense.moe`` (``upcycled_moe_config``). ``UpcycleError``
    naming the input at fault.
    """
    if dense.n_moe_layers:
        raise UpcycleError("dense", f"ModelConfig.first_k_dense={dense.first_k_dense}: the model to upcycle has "
                                    f"MoE layers (blocks {dense.first_k_dense}..{dense.n_layers - 1}); it must be "
                                    f"dense (first_k_dense = n_layers = {dense.n_layers})")
    first = DEFAULT_FIRST_K_DENSE if first_k_dense is None else first_k_dense
    if not 0 <= first < dense.n_layers:
        raise UpcycleError("first_k_dense", f"ModelConfig.first_k_dense={first}: must lie in [0, n_layers = "
                                            f"{dense.n_layers}) for some block to become MoE")
    moe = upcycled_moe_config(dense.moe, dense.dense_intermediate_size, segments, dict(moe_overrides or {}))
    return dense.replace(first_k_dense=first, moe=moe)


@torch.no_grad()
def _fill_moe(layer: MoELayer, gate_FH: torch.Tensor, up_FH: torch.Tensor, down_HF: torch.Tensor,
              router: torch.Generator) -> None:
    """``layer``'s experts from one dense FFN's weights, its router from ``router`` (module docstring)."""
    cfg = layer.config
    I, N_s, H = cfg.moe_intermediate_size, cfg.n_shared_experts, cfg.hidden_size
    m = gate_FH.shape[0] // I
    R = m - N_s
    if N_s:
        shared = layer.shared_experts
        shared.gate_proj.weight.copy_(gate_FH[:N_s * I])
        shared.up_proj.weight.copy_(up_FH[:N_s * I])
        shared.down_proj.weight.copy_(down_HF[:, :N_s * I])
    slice_E = N_s + layer.local_expert_ids() % R  # this rank's experts only
    gate_EHI = gate_FH.view(m, I, H)[slice_E].transpose(1, 2)
    up_EHI = up_FH.view(m, I, H)[slice_E].transpose(1, 2)
    layer.experts.w_in.copy_(torch.cat([gate_EHI, up_EHI], dim=2))
    layer.experts.w_out.copy_(down_HF.view(H, m, I).permute(1, 2, 0)[slice_E])
    copies = torch.randn(cfg.n_routed_experts // R, H, generator=router) * ROUTER_STD
    layer.router.weight.copy_(copies.repeat_interleave(R, dim=0))


@torch.no_grad()
def upcycle(dense: MoETransformerLM, config: ModelConfig, parallel: Optional[ParallelState] = None,
            seed: int = 0) -> MoETransformerLM:
    """The MoE model of ``config`` (``upcycled_config(dense.config, ...)``) holding ``dense``'s weights.

    Built at ``parallel``'s layout: each rank fills only its own experts
    (``MoELayer.local_expert_ids``). The routers are drawn from one
    generator seeded with ``seed``, layer by layer, so every rank and layout
    starts from the same global model. Collective over ``parallel``'s world
    (the layers' construction). On the CPU; move it afterwards.
    """
    model = MoETransformerLM(config, parallel, seed=seed)
    moe_paths = [path for path, module in model.named_modules() if isinstance(module, MoELayer)]  # depth order
    kept = {name: tensor for name, tensor in dense.state_dict().items()
            if name.rpartition(".ffn.")[0] + ".ffn" not in moe_paths}
    unexpected = model.load_state_dict(kept, strict=False).unexpected_keys  # the MoE layers are filled below
    if unexpected:
        raise UpcycleError("dense", f"upcycle: the dense model's {unexpected[:3]} have no place in the MoE model "
                                    f"(config not from upcycled_config(dense.config, ...)?)")
    router = torch.Generator().manual_seed(seed)
    for path in moe_paths:
        ffn = dense.get_submodule(path)
        _fill_moe(model.get_submodule(path), ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight,
                  router)
    return model

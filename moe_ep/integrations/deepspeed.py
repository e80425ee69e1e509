"""DeepSpeed integration: ``MoELayer`` as a ``deepspeed.moe.layer.MoE``.

DeepSpeed's engine treats a module as an MoE layer only when
``isinstance(module, deepspeed.moe.layer.MoE)``; then it

* reduces the gradients of parameters with ``p.allreduce = False`` over the
  expert-data-parallel group named ``p.group_name`` (``ep_size_<ep>``) and
  the others over the whole data-parallel group, both divided by the full
  data-parallel size (our convention: ``moe_ep/parallel/grads.py``);
* calls ``set_deepspeed_parallelism()`` on every module that has it;
* writes each expert of each MoE layer to its own checkpoint file
  (``layer_<L>_expert_<global id>_mp_rank_00_model_states.pt``), taking
  every key containing ``expert`` from the layer's ``state_dict()`` and
  requiring it to read ``...deepspeed_moe.experts.deepspeed_experts.<id>...``.

``DeepSpeedMoE`` is a subclass of DeepSpeed's ``MoE`` that skips
``MoE.__init__`` (only ``nn.Module.__init__`` runs) and holds our layer as
``.moe``; ``forward`` returns what the layer returns and the auxiliary loss
stays on the layer. Usage (docs/deepspeed.md has the details)::

    parallel = deepspeed_parallel_state(ep_size)       # init_distributed + DeepSpeed's groups
    model = MoETransformerLM(cfg, parallel)            # experts sharded with DeepSpeed's EP group
    wrap_moe_layers(model, ep_size)                    # every MoELayer -> DeepSpeedMoE, in place
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      model_parameters=optimizer_param_groups(model, weight_decay))

State dict layout of a wrapped layer (what ``engine.save_checkpoint``
stores; ``load_state_dict`` accepts it and the plain layout):

* ``deepspeed_moe.experts.deepspeed_experts.<local id>.w_in`` ``[H, J]`` and
  ``.w_out`` ``[I, H]``: one slice of the stacked ``experts.w_in`` /
  ``experts.w_out`` per expert (DeepSpeed renumbers them to global ids in
  the files);
* ``moe.shared_mlp.*``: the shared experts (``moe.shared_experts.*`` in the
  plain layout; renamed because DeepSpeed would take any key containing
  ``expert`` for a routed expert);
* every other key of the layer unchanged under ``moe.``.
"""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups

from ..dispatch import make_dispatcher
from ..layer import MoELayer
from ..model_moe import discard_moe_pending, moe_layers, update_moe_bias
from ..parallel.consistency import check_same_on_ranks
from ..parallel.grads import clip_gradients
from ..parallel.state import ParallelState, nodes_spanned
from ..parallel.timeout import DEFAULT_TIMEOUT, Timeout, as_timedelta, set_collective_timeout
from ..training.optim import set_lr
from ..training.step import StepResult, forward_backward, split_micro_batches

DS_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
EXPERT_PARAM_NAMES = ("w_in", "w_out")
_SHARED_PLAIN = "moe.shared_experts."
_SHARED_DS = "moe.shared_mlp."

__all__ = ["DeepSpeedMoE", "deepspeed_parallel_state", "deepspeed_precision", "expert_group_name", "grad_clip_plan",
           "moe_layers", "optimizer_param_groups", "parallel_state_from_groups", "train_step",
           "undo_initial_optimizer_step", "unwrap_moe_layers", "wrap_moe_layers"]


# ------------------------------------------------------------------ groups
def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert groups of size ``ep_size``."""
    return f"ep_size_{int(ep_size)}"


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _create_groups(ep_size: int, use_data_before_expert_parallel_: bool = False) -> str:
    """Create DeepSpeed's expert and expert-data-parallel groups of ``ep_size`` unless they exist."""
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size,
                                                use_data_before_expert_parallel_=use_data_before_expert_parallel_)
    return name


def parallel_state_from_groups(ep_size: int, nodes: Optional[int] = None) -> ParallelState:
    """A ``ParallelState`` whose groups are DeepSpeed's groups named ``ep_size_<ep_size>`` (must exist).

    ``ep_rank`` / ``dp_rank`` are this process's ranks in those groups, so
    the state agrees with DeepSpeed's layout whichever ordering created them
    (by default EP groups are consecutive ranks and expert-data-parallel
    groups strided, the layout of ``init_expert_parallel``'s mesh).
    ``nodes`` (nodes one EP group spans) defaults to the nodes its members'
    global ranks lie on (``LOCAL_WORLD_SIZE`` ranks per node;
    ``moe_ep.parallel.state.nodes_spanned``), so the node layout, and with
    it the inter-/intra-node traffic counters, is right in either of
    DeepSpeed's rank orders; every rank must find the same count.
    """
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        raise RuntimeError(f"DeepSpeed expert groups {name!r} do not exist yet: call deepspeed_parallel_state "
                           f"or set_deepspeed_parallelism first")
    world = dist.get_world_size()
    ep_group = groups._get_expert_parallel_group(name)
    edp_group = groups._get_expert_data_parallel_group(name)
    if dist.get_world_size(group=ep_group) != ep_size:
        raise RuntimeError(f"DeepSpeed group {name!r} has {dist.get_world_size(group=ep_group)} ranks, "
                           f"expected {ep_size}")
    if nodes is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        try:
            nodes = nodes_spanned(dist.get_process_group_ranks(ep_group), local)
        except ValueError as err:
            nodes, layout_error = 0, err
        check_same_on_ranks(f"DeepSpeed expert groups {name!r}", dict(nodes_spanned=nodes))
        if nodes == 0:
            raise layout_error
    return ParallelState(ep_size=ep_size, ep_rank=dist.get_rank(group=ep_group), dp_size=world // ep_size,
                         dp_rank=dist.get_rank(group=edp_group), nodes=nodes, ep_group=ep_group,
                         edp_group=edp_group, world_group=dist.group.WORLD)


def deepspeed_parallel_state(ep_size: int, nodes: Optional[int] = None, dist_backend: Optional[str] = None,
                             use_data_before_expert_parallel_: bool = False,
                             timeout: Timeout = DEFAULT_TIMEOUT) -> ParallelState:
    """Initialise DeepSpeed's communication and its expert groups now; return our ``ParallelState``.

    Build the model with this state (its experts are sharded at
    construction), then ``deepspeed.initialize``: the engine's
    ``set_deepspeed_parallelism`` finds the groups already there.
    ``dist_backend`` defaults to NCCL with CUDA and gloo without (the only
    choice on CPU: ``DS_ACCELERATOR=cpu``). ``use_data_before_expert_parallel_``
    must match the engine config's value of the same name. As in
    ``init_expert_parallel``, every rank's ``ep_size`` and ``nodes`` are
    compared first and ``timeout`` bounds the collectives of the default
    group and of the expert groups.
    """
    import deepspeed

    timeout = as_timedelta(timeout)
    deepspeed.init_distributed(dist_backend=dist_backend or _default_backend(), timeout=timeout)
    set_collective_timeout(timeout, dist.group.WORLD)
    world = dist.get_world_size()
    check_same_on_ranks("deepspeed_parallel_state", dict(world_size=world, ep_size=ep_size, nodes=nodes))
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"deepspeed_parallel_state: ep_size={ep_size} does not divide the world size {world}")
    _create_groups(ep_size, use_data_before_expert_parallel_)
    state = parallel_state_from_groups(ep_size, nodes)
    set_collective_timeout(timeout, state.ep_group, state.edp_group)
    return state


# ----------------------------------------------------------------- wrapper
def _to_deepspeed_layout(module: "DeepSpeedMoE", state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: stacked expert tensors -> one key per local expert; shared experts renamed."""
    for name in EXPERT_PARAM_NAMES:
        key = f"{prefix}moe.experts.{name}"
        if key in state_dict:
            stacked = state_dict.pop(key)
            for local_id in range(stacked.shape[0]):
                state_dict[f"{prefix}{DS_EXPERT_PREFIX}{local_id}.{name}"] = stacked[local_id]
    for key in [k for k in state_dict if k.startswith(prefix + _SHARED_PLAIN)]:
        state_dict[prefix + _SHARED_DS + key[len(prefix + _SHARED_PLAIN):]] = state_dict.pop(key)


def _from_deepspeed_layout(module: "DeepSpeedMoE", state_dict: dict, prefix: str, local_metadata, strict,
                           missing_keys, unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: the inverse of ``_to_deepspeed_layout`` (the plain layout passes through).

    Per-expert keys are stacked only when every local expert is present;
    otherwise they are left for the strict check to report.
    """
    for name in EXPERT_PARAM_NAMES:
        keys = [f"{prefix}{DS_EXPERT_PREFIX}{i}.{name}" for i in range(module.num_local_experts)]
        if keys and all(k in state_dict for k in keys):
            state_dict[f"{prefix}moe.experts.{name}"] = torch.stack([state_dict.pop(k) for k in keys])
    for key in [k for k in state_dict if k.startswith(prefix + _SHARED_DS)]:
        state_dict[prefix + _SHARED_PLAIN + key[len(prefix + _SHARED_DS):]] = state_dict.pop(key)


def _remark_after_load(module: "DeepSpeedMoE", incompatible_keys) -> None:
    module.mark_expert_params()  # load_state_dict(assign=True) installs new Parameter objects


class DeepSpeedMoE(MoE):
    """Our ``MoELayer`` seen by DeepSpeed as a native MoE layer (see the module docstring).

    ``layer``: the ``MoELayer`` to hold (``.moe``); its ``parallel.ep_size``
    gives ``ep_size`` and the group name ``ep_size_<ep>``. ``forward(x)``
    returns ``layer(x)``; ``aux_loss``, ``last_stats``, ``update_bias``,
    ``full_state_dict`` and ``load_full_state_dict`` are the layer's.
    """

    def __init__(self, layer: MoELayer):
        nn.Module.__init__(self)  # not MoE.__init__: that would build DeepSpeed's own gate and experts
        if not isinstance(layer, MoELayer):
            raise TypeError(f"DeepSpeedMoE wraps a moe_ep.MoELayer, got {type(layer).__name__}")
        self.moe = layer
        self.ep_size = layer.parallel.ep_size
        self.num_experts = layer.config.n_routed_experts
        self.num_local_experts = self.num_experts // self.ep_size
        self.expert_group_name = expert_group_name(self.ep_size)
        self.use_residual = False  # attributes of MoE that DeepSpeed code may read
        self.enable_expert_tensor_parallelism = False
        self.register_state_dict_post_hook(_to_deepspeed_layout)
        self.register_load_state_dict_pre_hook(_from_deepspeed_layout)
        self.register_load_state_dict_post_hook(_remark_after_load)
        self.mark_expert_params()

    # ------------------------------------------------------------- marks
    def expert_parameters(self) -> list[nn.Parameter]:
        """The routed experts' parameters (this rank's shard): ``experts.w_in``, ``experts.w_out``."""
        return list(self.moe.experts.parameters())

    def mark_expert_params(self) -> None:
        """Set DeepSpeed's expert marks: ``allreduce = False``, ``group_name = 'ep_size_<ep>'``.

        Called at construction, from ``set_deepspeed_parallelism``, after
        ``deepcopy``, ``_apply`` (``.to()``, ``.float()``...) and
        ``load_state_dict``: anything that creates new Parameter objects.
        """
        for p in self.expert_parameters():
            p.allreduce = False
            p.group_name = self.expert_group_name

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.mark_expert_params()
        return out

    def __deepcopy__(self, memo: dict) -> "DeepSpeedMoE":
        # Process groups cannot be copied: the copy shares the layer's ParallelState and dispatcher
        # (handles to the same groups, no tensors).
        for shared in (self.moe.parallel, self.moe.dispatcher, self.moe.side_stream, self.moe.parallel.ep_group,
                       self.moe.parallel.edp_group, self.moe.parallel.world_group, self.moe.parallel.mesh):
            if shared is not None:
                memo[id(shared)] = shared
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        clone.mark_expert_params()
        return clone

    # ------------------------------------------------------------ groups
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: create the groups if absent, move the layer onto them.

        The layer's ``ParallelState`` is replaced by one built from
        DeepSpeed's groups (and its all-to-all dispatcher rebuilt on
        DeepSpeed's EP group); the layer must already hold the experts of
        this process's EP rank there.
        """
        _create_groups(self.ep_size, use_data_before_expert_parallel_)
        self.adopt_parallel_state(parallel_state_from_groups(self.ep_size, nodes=self.moe.parallel.nodes))
        self.mark_expert_params()

    def adopt_parallel_state(self, state: ParallelState) -> None:
        """Run the layer on ``state``'s groups (same EP size and rank as the layer was built with)."""
        layer = self.moe
        old = layer.parallel
        if state is old:
            return
        if (state.ep_size, state.ep_rank) != (old.ep_size, old.ep_rank):
            raise ValueError(f"DeepSpeedMoE: the layer holds the experts of EP rank {old.ep_rank} of {old.ep_size} "
                             f"but DeepSpeed's groups put this process at EP rank {state.ep_rank} of "
                             f"{state.ep_size}; build the model with deepspeed_parallel_state(ep_size)")
        layer.parallel = state
        layer.dispatcher = make_dispatcher(layer.config.dispatcher, state, self.num_experts,
                                           overlap_shared=layer.dispatcher.overlap_shared,
                                           chunks=layer.config.overlap_chunks)

    # ----------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``MoELayer.forward``: the output only (the auxiliary loss stays on ``.moe``)."""
        return self.moe(hidden_states)

    @property
    def aux_loss(self) -> torch.Tensor:
        return self.moe.aux_loss

    @property
    def last_stats(self):
        return self.moe.last_stats

    def update_bias(self) -> None:
        self.moe.update_bias()

    def full_state_dict(self) -> dict:
        """The layer's unsharded state dict in the plain layout (collective over the EP group)."""
        return self.moe.full_state_dict()

    def load_full_state_dict(self, state_dict: dict) -> None:
        self.moe.load_full_state_dict(state_dict)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, ep_size={self.ep_size}, group={self.expert_group_name!r}"


# ------------------------------------------------------------ model level
def _children_to_replace(model: nn.Module, cls: type) -> list[tuple[nn.Module, str, nn.Module]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, cls)]


def wrap_moe_layers(model: nn.Module, ep_size: Optional[int] = None) -> list[DeepSpeedMoE]:
    """Replace every ``MoELayer`` of ``model`` by a ``DeepSpeedMoE`` holding it, in place.

    Layers already wrapped are left alone. ``ep_size`` (optional) must equal
    each layer's ``parallel.ep_size``: the sharding is fixed at construction.
    Returns the wrappers in module order. Parameter names gain a ``.moe``
    level (``...ffn.moe.experts.w_in``). Wrap before ``deepspeed.initialize``.
    """
    if isinstance(model, MoELayer):
        raise ValueError("wrap_moe_layers: the model is itself an MoELayer; use DeepSpeedMoE(layer)")
    wrappers = []
    for parent, name, layer in _children_to_replace(model, MoELayer):
        if isinstance(parent, DeepSpeedMoE):
            wrappers.append(parent)
            continue
        if ep_size is not None and layer.parallel.ep_size != ep_size:
            raise ValueError(f"wrap_moe_layers: layer {name!r} was built with ep_size={layer.parallel.ep_size}, "
                             f"not {ep_size}; build the model with deepspeed_parallel_state({ep_size})")
        wrapper = DeepSpeedMoE(layer)
        setattr(parent, name, wrapper)
        wrappers.append(wrapper)
    return wrappers


def unwrap_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Put the plain ``MoELayer``s back in place of their wrappers (plain names and state dict layout)."""
    layers = []
    for parent, name, wrapper in _children_to_replace(model, DeepSpeedMoE):
        setattr(parent, name, wrapper.moe)
        layers.append(wrapper.moe)
    return layers


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups for DeepSpeed's optimizer: the plain loop's decay rule, split for MoE.

    As ``moe_ep.training.optim.build_optimizer``: weight decay on tensors of
    2+ dims (embedding, projections, routers, expert stacks), none on 1-D
    ones (norm weights). Then ``split_params_into_different_moe_groups_for_optimizer``
    moves the expert parameters (marked) to groups named ``ep_size_<ep>``
    with ``moe=True``, which ZeRO partitions over the expert-data-parallel
    group. Call after ``wrap_moe_layers``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    base = [dict(name="decay", params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
            dict(name="no_decay", params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(base) if g["params"]]


# ----------------------------------------------------------------- training
def deepspeed_precision(ds_config: dict) -> str:
    """``fp32``, ``bf16`` or ``fp16``: the config's enabled mixed-precision section (raises if both are)."""
    enabled = [name for name in ("bf16", "fp16") if ds_config.get(name, {}).get("enabled", False)]
    if len(enabled) > 1:
        raise ValueError("DeepSpeed config: bf16 and fp16 are both enabled; enable one")
    return enabled[0] if enabled else "fp32"


def undo_initial_optimizer_step(engine) -> bool:
    """Undo the zero-gradient step DeepSpeed's ``FP16_UnfusedOptimizer`` takes at construction; True if it did.

    DeepSpeed 0.19.8 wraps a torch optimizer in ``FP16_UnfusedOptimizer``
    for bf16 at ZeRO stage 0, and its ``initialize_optimizer_states`` runs one
    ``step()`` with zero gradients: AdamW's step counter starts at 1 (every
    later bias correction is one step late: the first update is 0.73 of
    AdamW's for betas (0.9, 0.95)) and decoupled weight decay shrinks the fp32
    masters once by ``lr * weight_decay`` (DeepSpeed issue #5151; PR #5104
    removes the step for ZeRO). This clears the optimizer state (AdamW
    re-creates it at its next step, at step 0) and copies the masters back
    from the bf16 weights, which that step did not touch (the masters were
    copied from them). Call it once, right after ``deepspeed.initialize``.
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return False
    optimizer.optimizer.state.clear()
    with torch.no_grad():
        for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for low, high in zip(lows, highs):
                high.copy_(low)
    return True


def grad_clip_plan(ds_config: dict) -> tuple[dict, Optional[float]]:
    """(config for ``deepspeed.initialize``, max norm to clip with ``clip_gradients`` ourselves, or None).

    ZeRO 1/2 compute the global norm of an MoE model correctly (expert
    shards' squares are summed over the data-parallel group), so their
    ``gradient_clipping`` is kept. Without ZeRO (stage 0) DeepSpeed averages
    the per-rank norms, which is not the global norm once experts are
    sharded; there the returned config has clipping off and ``train_step``
    clips with ``moe_ep.parallel.grads.clip_gradients`` after the reduction
    (bf16 gradients under ``bf16``, which has no loss scale). ``fp16`` at
    stage 0 raises ``ValueError``: the gradients there carry the loss scale.
    """
    config = copy.deepcopy(ds_config)
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage == 0 and deepspeed_precision(config) == "fp16":
        raise ValueError("DeepSpeed config: fp16 needs ZeRO stage 1 or 2 with moe_ep: at stage 0 the parameters' "
                         "gradients are loss-scaled where train_step measures and clips the global norm")
    clip = float(config.get("gradient_clipping", 0.0) or 0.0)
    if stage == 0 and clip > 0:
        config["gradient_clipping"] = 0.0
        return config, clip
    return config, None


def train_step(engine, model: nn.Module, batch: torch.Tensor, lr: float, parallel: ParallelState,
               manual_clip: Optional[float]) -> StepResult:
    """One optimizer step through the engine, as the plain loop's step (``moe_ep.training.step``).

    ``batch`` is split into the engine's ``gradient_accumulation_steps``
    micro-batches; each: ``loss = CE + aux`` -> ``engine.backward`` (which
    divides by their number; the gradient reduction happens at the last),
    ``engine.step()`` between micro-batches (no update there). Then clipping
    (``manual_clip`` from ``grad_clip_plan``, else DeepSpeed's) ->
    ``engine.step()`` -> the MoE layers close the step: ``update_moe_bias``
    when the engine applied it, ``discard_moe_pending`` when it skipped it
    (fp16 overflow: ``engine.was_step_applied()`` is False). ``grad_norm`` is
    the global norm before clipping (our measurement at stage 0, DeepSpeed's
    with ZeRO, NaN when DeepSpeed computed none).
    """
    set_lr(engine.optimizer, lr)
    micro_batches = split_micro_batches(batch, engine.gradient_accumulation_steps())

    def backward(loss: torch.Tensor, last: bool) -> None:
        engine.backward(loss)
        if not last:
            engine.step()  # counts the micro-step; the update happens at the boundary

    result = forward_backward(engine, model, micro_batches, backward)
    norm = None
    if engine.zero_optimization_stage() == 0:
        norm = clip_gradients(model, parallel, manual_clip)  # measures only when manual_clip is None
    engine.step()
    if norm is None:
        ds_norm = engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if ds_norm is None else float(ds_norm))
    result.grad_norm = norm.detach().float()
    result.applied = engine.was_step_applied()
    if result.applied:
        update_moe_bias(model)
    else:
        discard_moe_pending(model)
    return result

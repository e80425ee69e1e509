"""DeepSpeed integration: ``MoELayer`` as a ``deepspeed.moe.layer.MoE``.

DeepSpeed's engine treats a module as an MoE layer only when
``isinstance(module, deepspeed.moe.layer.MoE)``; then it

* reduces the gradients of parameters with ``p.allreduce = False`` over the
  expert-data-parallel group named ``p.group_name`` (``ep_size_<ep>``) and
  the others over the whole data-parallel group, both divided by the full
  data-parallel size (our convention: ``moe_ep/gradients.py``);
* calls ``set_deepspeed_parallelism()`` on every module that has it;
* writes each expert of each MoE layer to its own checkpoint file
  (``layer_<L>_expert_<global id>_mp_rank_00_model_states.pt``), taking
  every key containing ``expert`` from the layer's ``state_dict()`` and
  requiring it to read ``...deepspeed_moe.experts.deepspeed_experts.<id>...``.

``DeepSpeedMoE`` is a subclass of DeepSpeed's ``MoE`` that skips
``MoE.__init__`` (only ``nn.Module.__init__`` runs) and holds our layer as
``.moe``; ``forward`` returns what the layer returns and the auxiliary loss
stays on the layer (``moe_ep.model_moe`` finds wrapped layers too). Usage (docs/deepspeed.md has the details)::

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
from deepspeed.utils import groups

from ..dispatch import make_dispatcher
from ..layer import MoELayer
from ..model_moe import child_slots
from ..parallel.consistency import check_same_on_ranks
from ..parallel.state import ParallelState, nodes_spanned
from ..parallel.timeout import DEFAULT_TIMEOUT, Timeout, as_timedelta, set_collective_timeout

DS_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
EXPERT_PARAM_NAMES = ("w_in", "w_out")
_SHARED_PLAIN = "moe.shared_experts."
_SHARED_DS = "moe.shared_mlp."

__all__ = ["DeepSpeedMoE", "deepspeed_parallel_state", "expert_group_name", "parallel_state_from_groups",
           "unwrap_moe_layers", "wrap_moe_layers"]


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
    returns ``layer(x)``; ``full_state_dict`` and ``load_full_state_dict`` are
    the layer's (its aux loss, statistics and bias update are reached through
    ``moe_ep.model_moe``, which finds the layer inside).
    """

    def __init__(self, layer: MoELayer):
        nn.Module.__init__(self)  # not MoE.__init__: that would build DeepSpeed's own gate and experts
        if not isinstance(layer, MoELayer):
            raise TypeError(f"DeepSpeedMoE wraps a moe_ep.MoELayer, got {type(layer).__name__}")
        if layer.placement is not None:
            raise ValueError(f"DeepSpeedMoE: MoELayer {layer.name!r} has an expert placement (redundant_experts="
                             f"{layer.config.redundant_experts}); DeepSpeed's optimizer cannot sum replicas' "
                             f"gradients: train it with launch/train.py")
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

    def full_state_dict(self) -> dict:
        """The layer's unsharded state dict in the plain layout (collective over the EP group)."""
        return self.moe.full_state_dict()

    def load_full_state_dict(self, state_dict: dict) -> None:
        self.moe.load_full_state_dict(state_dict)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, ep_size={self.ep_size}, group={self.expert_group_name!r}"


# ------------------------------------------------------------ model level
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
    for parent, name in child_slots(model, lambda child: isinstance(child, MoELayer)):
        layer = getattr(parent, name)
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
    for parent, name in child_slots(model, lambda child: isinstance(child, DeepSpeedMoE)):
        wrapper = getattr(parent, name)
        setattr(parent, name, wrapper.moe)
        layers.append(wrapper.moe)
    return layers

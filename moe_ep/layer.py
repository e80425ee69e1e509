"""``MoELayer``: router -> dropping -> dispatch -> experts -> combine, plus shared experts.

    y_t = sum_{i=1..N_s} FFN^(s)_i(u_t) + sum_{kept (t, i)} g_{i,t} FFN^(r)_i(u_t)

The residual ``u_t`` is added by the surrounding block (as in transformers'
DeepSeek models). After each forward, ``layer.aux_loss`` holds the sum of the
enabled balance losses (a scalar with gradient, or a zero tensor) and
``layer.last_stats`` the global routing statistics. docs/design.md has the
data flow.

Precision: the router, scores, balance losses and statistics are computed in
``router_dtype`` (fp32 by default), the experts in the *compute dtype*: the
autocast dtype when autocast is on for the input's device, else the input's
dtype. The input is cast to it once, before dispatch, so rows cross the
all-to-all in it; inside the layer autocast is off and every dtype is explicit.

Ranks agree before they communicate: at ep > 1 every forward starts with one
small all-gather over the EP group, made whatever the mode, of each rank's
tokens, sequences, training flag, compute dtype and forward count. Ranks that
differ in the training flag (one in ``eval()``), the compute dtype (autocast
on one rank only) or the forward count (a forward one rank skipped) raise the
same ``ValueError`` together, naming the layer, the field and each rank's
value, instead of issuing different collectives. The token and sequence
counts give the drop step its global token and sequence ids.

Per optimizer step (training forwards only): the global loads and the number
of forwards that applied a capacity are *pending* until ``update_bias()``
commits them (V3 bias step, ``drop_step`` advanced) or ``discard_pending()``
drops them (a step the optimizer skipped). Activation checkpointing runs the
first forward inside ``recording(log)`` and its recomputation inside
``recomputing(log)``: the recomputation replays the drop step the first
forward used (hence the same routing and dropping) and changes no state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from .balance import RoutingStats, aux_loss, global_counts, routing_stats
from .config import MoEConfig
from .dispatch import make_dispatcher
from .dispatch.side_stream import SideStream
from .dropping import DropRule, PairKeys, protected_sequences
from .eplb.move import move_expert_slots
from .eplb.placement import Placement
from .eplb.planner import plan_placement
from .experts import RoutedExperts, SharedExperts
from .finite import count_nonfinite, raise_if_nonfinite
from .parallel.consistency import check_same_on_ranks, describe_mismatch
from .parallel.state import ParallelState
from .precision import autocast_off, compute_dtype
from .router import Router


COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # input and compute dtypes


def _resolve_devices(config: MoEConfig, parallel: ParallelState) -> int:
    """D of the device-level losses and dropping (the EP size when sharded)."""
    if parallel.ep_size == 1:
        return config.device_groups or config.n_group
    if config.device_groups not in (None, parallel.ep_size):
        raise ValueError(f"MoEConfig.device_groups={config.device_groups} must equal ep_size={parallel.ep_size} "
                         f"when experts are sharded (a device group is a device)")
    return parallel.ep_size


def _check_placement(config: MoEConfig, parallel: ParallelState) -> None:
    E, ep = config.n_routed_experts, parallel.ep_size
    if E % ep:
        raise ValueError(f"MoEConfig.n_routed_experts={E} is not divisible by ep_size={ep}")
    if config.topk_method != "greedy" and config.n_group % ep and ep % config.n_group:
        raise ValueError(f"MoEConfig.n_group={config.n_group} and ep_size={ep}: one must divide the other, "
                         f"or a routing group is not a set of whole devices")
    if config.topk_method == "node_limited" and parallel.nodes > 1 and config.n_group != parallel.nodes:
        raise ValueError(f"MoEConfig.n_group={config.n_group} must equal the {parallel.nodes} nodes of the "
                         f"expert-parallel group for node-limited routing")
    if config.redundant_experts % ep:
        raise ValueError(f"MoEConfig.redundant_experts={config.redundant_experts} is not a multiple of ep_size={ep} "
                         f"(every rank holds the same number of expert slots)")


def placement_groups(config: MoEConfig, nodes: int) -> int:
    """Expert groups ``moe_ep.eplb.plan_placement`` keeps whole on one node for this routing.

    Group-limited routing (V2 device-, V3 node-limited): the routing groups, cut into sub-blocks when
    there are fewer groups than nodes (``lcm(n_group, nodes)``), so a token limited to M groups reaches
    at most the nodes it reaches with one slot per expert in id order. Greedy routing: single experts
    (any expert may go to any node).
    """
    if config.topk_method != "greedy" and config.n_group > 1:
        return math.lcm(config.n_group, nodes)
    return config.n_routed_experts


def check_layout(config: MoEConfig, parallel: ParallelState) -> int:
    """D of the device-level losses and dropping, after checking ``config`` can be sharded over ``parallel``.

    ``ValueError`` naming both sizes otherwise (placement and device groups);
    no communication, so the launchers check their flags with it too.
    """
    _check_placement(config, parallel)
    return _resolve_devices(config, parallel)


@dataclasses.dataclass
class ReplayLog:
    """The drop steps (protected-sequence windows) and replayed experts (``moe_ep.replay``; None when the router
    chose) one checkpointed forward of a layer used, in call order."""

    drop_steps: list[int] = field(default_factory=list)
    cursor: int = 0
    routes: list[Optional[torch.Tensor]] = field(default_factory=list)
    route_cursor: int = 0


class MoELayer(nn.Module):
    """A DeepSeek-family MoE FFN; pass ``parallel`` to hold only this rank's experts.

    ``name`` identifies the layer in errors (the model passes its module path).
    Under ``parallel`` (with a process group), construction is collective over
    the world: every rank must build its layers in the same order with the
    same config and layout (compared by ``check_same_on_ranks``; a mismatch
    raises on every rank).
    ``forward_count``: forward calls so far (training and eval, recomputations
    excluded), the "step" named by ``check_finite`` errors; at ep > 1 the EP
    ranks compare it, with the mode and compute dtype, at every forward
    (module docstring).
    ``load_accum`` (float64) and ``pending_drop_forwards``: the loads and
    capacity forwards of the optimizer step in progress (module docstring).
    """

    def __init__(self, config: MoEConfig, parallel: Optional[ParallelState] = None, name: str = "moe"):
        super().__init__()
        parallel = parallel or ParallelState()
        if parallel.distributed:
            layout = dict(ep_size=parallel.ep_size, dp_size=parallel.dp_size, nodes=parallel.nodes)
            check_same_on_ranks(f"MoELayer {name!r}", {**dataclasses.asdict(config), **layout}, parallel.world_group)
        self.n_devices = check_layout(config, parallel)
        self.config = config
        self.parallel = parallel
        self.name = name
        # forward_count and pending_drop_forwards live in tensors: a compiled (sync-free) forward updates them in
        # its graph, where Python ints on the module would be constants that recompile it whenever they change
        self.register_buffer("_forward_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("_pending_drop_forwards", torch.zeros((), dtype=torch.long), persistent=False)
        E, K = config.n_routed_experts, config.num_experts_per_tok
        if config.topk_method == "greedy":
            self.device_limit = min(K, self.n_devices)
        else:
            per_group = max(1, self.n_devices // config.n_group)
            self.device_limit = min(K, self.n_devices, config.topk_group * per_group)
        self.router = Router(config)
        self.experts = RoutedExperts(config, E // parallel.ep_size)
        self.shared_experts = SharedExperts(config) if config.n_shared_experts else None
        self.placement: Optional[Placement] = None
        self.dispatcher = self._make_dispatcher()
        self.side_stream = SideStream()
        self.register_buffer("drop_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("load_accum", torch.zeros(E, dtype=torch.float64), persistent=False)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_stats: Optional[RoutingStats] = None
        self._log: Optional[ReplayLog] = None
        self._replaying = False
        # moe_ep.replay: each forward's chosen experts [T, K] are appended to routing_record when it is a list;
        # routing_replay(T) supplies the experts of a forward's T tokens instead of the router's top-K
        self.routing_record: Optional[list[torch.Tensor]] = None
        self.routing_replay: Optional[Callable[[int], torch.Tensor]] = None
        if config.redundant_experts:  # a first plan, for equal loads; collective (moves the experts)
            self.set_placement(self.plan(torch.ones(E)))

    def _apply(self, fn, recurse=True):
        # Casting the module (.to(dtype), .bfloat16(), ...) leaves the pending loads in float64: they are counts.
        out = super()._apply(fn, recurse)
        self.load_accum = self.load_accum.double()
        return out

    @property
    def forward_count(self) -> int:
        """Forward calls so far (class docstring); one host read."""
        return int(self._forward_count)

    @forward_count.setter
    def forward_count(self, value: int) -> None:
        self._forward_count.fill_(value)

    @property
    def pending_drop_forwards(self) -> int:
        """Training forwards of the step in progress that applied a capacity (module docstring); one host read."""
        return int(self._pending_drop_forwards)

    @contextlib.contextmanager
    def recording(self, log: ReplayLog) -> Iterator[None]:
        """Training forwards inside note the drop step they use in ``log`` (a checkpointed region's first forward)."""
        with self._using_log(log, replay=False):
            yield

    @contextlib.contextmanager
    def recomputing(self, log: ReplayLog) -> Iterator[None]:
        """Forwards inside replay the ones ``recording(log)`` saw (activation checkpointing's recomputation).

        They use the same drop steps, in order (so with the same input and
        router noise they route and drop identically), and change no state:
        ``aux_loss``, ``last_stats``, ``load_accum``, the pending drop step and
        ``forward_count`` stay those of the first forward. They make the same
        collectives as any forward, so every rank must recompute alike.
        """
        log.cursor = log.route_cursor = 0
        with self._using_log(log, replay=True):
            yield

    @contextlib.contextmanager
    def _using_log(self, log: ReplayLog, replay: bool) -> Iterator[None]:
        previous = self._log, self._replaying
        self._log, self._replaying = log, replay
        try:
            yield
        finally:
            self._log, self._replaying = previous

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.dim() == 0 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"MoELayer {self.name!r}: expected input [..., {cfg.hidden_size}], got {tuple(x.shape)}")
        dtype = compute_dtype(x)
        if x.dtype not in COMPUTE_DTYPES or dtype not in COMPUTE_DTYPES:
            raise ValueError(f"MoELayer {self.name!r}: input of dtype {x.dtype} (compute dtype {dtype}); the layer "
                             f"takes and computes in {', '.join(map(str, COMPUTE_DTYPES))}")
        with autocast_off(x.device.type):
            return self._forward(x.reshape(-1, cfg.hidden_size), x.shape, dtype)

    def _forward(self, x_TH: torch.Tensor, shape: torch.Size, expert_dtype: torch.dtype) -> torch.Tensor:
        cfg = self.config
        replay = self._replaying
        if not replay:
            self._forward_count += 1
        T = x_TH.shape[0]
        seq_len = shape[-2] if len(shape) >= 3 else T
        n_seq = T // seq_len if seq_len else 0
        seq_id_T = torch.arange(T, device=x_TH.device) // max(seq_len, 1)

        scope = self._agree_on_forward(T, n_seq, expert_dtype, x_TH.device)
        routing = self.router(x_TH, self._replayed_experts(T))
        if self.routing_record is not None and not replay:
            self.routing_record.append(routing.topk_idx_TK)
        rule, keys = self._drop_plan(routing, seq_id_T, T, scope)
        x_TH = x_TH.to(expert_dtype)  # once, before dispatch: rows cross the all-to-all in the compute dtype
        shared = None
        if self.shared_experts is not None:  # on a GPU: a side stream, joined before the sum
            shared = lambda: self.side_stream.launch(self.shared_experts, x_TH)  # noqa: E731
        result = self.dispatcher(x_TH, routing.topk_idx_TK, routing.topk_weight_TK, keys, rule,
                                 self.experts, shared)
        y_TH = result.y_TH
        if result.side_out is not None:
            y_TH = y_TH + self.side_stream.join(result.side_out)

        nonfinite_C = count_nonfinite(x_TH, routing.logits_TE, y_TH) if cfg.check_finite else None
        counts = global_counts(routing, result.keep_TK, result.processed_pairs, n_seq, self.n_devices,
                               self.parallel, nonfinite_C)
        if nonfinite_C is not None and not replay:  # a replay sees the checked values again
            mode = "training" if self.training else "eval"
            raise_if_nonfinite(counts.nonfinite_C, nonfinite_C,
                               f"MoELayer {self.name!r}, forward {self.forward_count} ({mode})")
        loss = aux_loss(routing, seq_id_T, n_seq, counts, cfg, self.n_devices, self.device_limit, self.parallel)
        if not replay:
            self.aux_loss = loss if loss is not None else y_TH.new_zeros((), dtype=torch.float32)
            self.last_stats = routing_stats(counts, cfg.num_experts_per_tok, result.traffic)
            if self.training:
                self.load_accum += counts.load_E
                self._pending_drop_forwards += rule is not None
        return y_TH.view(shape)

    def _agree_on_forward(self, T: int, n_seq: int, expert_dtype: torch.dtype,
                          device: torch.device) -> list[tuple[int, int]]:
        """(tokens, sequences) of every EP rank in this forward, after checking the ranks agree on it.

        At ep > 1 this is the forward's first collective (module docstring):
        one all-gather of five integers per rank and one host read; a
        mismatch raises on every rank. At ep 1 there is no one to agree with;
        a sync-free layer neither (no host read; its capacities are each
        rank's own: moe_ep/dispatch/padded.py).
        """
        if self.parallel.ep_size == 1 or self.config.sync_free:
            return [(T, n_seq)]
        mine = torch.tensor([[T, n_seq, int(self.training), COMPUTE_DTYPES.index(expert_dtype), self.forward_count]],
                            device=device)
        rows = self.parallel.all_gather_ep(mine).tolist()
        fields = [dict(forward_count=count, training=bool(training), compute_dtype=COMPUTE_DTYPES[code])
                  for _, _, training, code, count in rows]
        mismatch = describe_mismatch(f"MoELayer {self.name!r}", fields,
                                     dist.get_process_group_ranks(self.parallel.ep_group or dist.group.WORLD))
        if mismatch:
            raise ValueError(mismatch)
        return [(tokens, sequences) for tokens, sequences, *_ in rows]

    def _capacity_factors(self) -> tuple[Optional[float], Optional[float]]:
        """(expert, device) capacity factors in force, None where unlimited."""
        cfg = self.config
        if self.training:
            return cfg.expert_capacity_factor, cfg.device_capacity_factor
        if cfg.eval_capacity_factor is None:  # sync-free buffers are sized by a capacity: the training one
            return (cfg.expert_capacity_factor, cfg.device_capacity_factor) if cfg.sync_free else (None, None)
        return (cfg.eval_capacity_factor if cfg.expert_capacity_factor is not None else None,
                cfg.eval_capacity_factor if cfg.device_capacity_factor is not None else None)

    def _drop_plan(self, routing, seq_id_T: torch.Tensor, T: int,
                   scope: list[tuple[int, int]]) -> tuple[Optional[DropRule], Optional[PairKeys]]:
        """The capacity rule of this forward and the ranking keys of this rank's pairs.

        Token and sequence ids are made global to the EP group (the scope of
        the capacities) from ``scope``, every EP rank's (tokens, sequences)
        in EP rank order (``_agree_on_forward``).
        """
        cfg = self.config
        expert_cf, device_cf = self._capacity_factors()
        if expert_cf is None and device_cf is None:
            return None, None
        device = seq_id_T.device
        K = cfg.num_experts_per_tok
        rank = 0 if cfg.sync_free else self.parallel.ep_rank  # sync-free: the scope is this rank alone
        token_offset, seq_offset = sum(t for t, _ in scope[:rank]), sum(s for _, s in scope[:rank])
        n_tokens, n_seq_total = sum(t for t, _ in scope), sum(s for _, s in scope)
        rule = DropRule(n_tokens=n_tokens, top_k=K, n_experts=cfg.n_routed_experts, n_devices=self.n_devices,
                        expert_cf=expert_cf, device_cf=device_cf, policy=cfg.drop_policy)
        if self.training:
            protected_T = protected_sequences(seq_id_T + seq_offset, n_seq_total, cfg.protected_seq_frac,
                                              self._drop_index())
        else:
            protected_T = torch.zeros(T, dtype=torch.bool, device=device)
        keys = PairKeys(
            expert_P=routing.topk_idx_TK.flatten(),
            affinity_P=routing.scores_TE.detach().gather(1, routing.topk_idx_TK).flatten(),
            protected_P=protected_T.repeat_interleave(K),
            token_P=(torch.arange(T, device=device) + token_offset).repeat_interleave(K),
            slot_P=torch.arange(K, device=device).repeat(T),
        )
        return rule, keys

    def _replayed_experts(self, T: int) -> Optional[torch.Tensor]:
        """The experts ``[T, K]`` a routing replay imposes on this forward (``routing_replay``), else None.

        The first forward of a checkpointed region notes them in its log and
        its recomputation takes them from there, whether or not the replay is
        still active by then.
        """
        log = self._log
        if self._replaying:
            log.route_cursor += 1
            return log.routes[log.route_cursor - 1]
        forced = None if self.routing_replay is None else self.routing_replay(T)
        if log is not None:
            log.routes.append(forced)
        return forced

    def _drop_index(self) -> int | torch.Tensor:
        """The protected-sequence window of this training forward: committed + pending capacity forwards.

        A replay (``recomputing``) reads the index of the forward it replays from the log. An int (one host
        read), or a 0-d tensor in a sync-free layer.
        """
        log = self._log
        if self._replaying:
            if log.cursor >= len(log.drop_steps):
                raise RuntimeError(f"MoELayer {self.name!r}: a recomputation ran more capacity forwards than the "
                                   f"checkpointed forward recorded ({len(log.drop_steps)})")
            log.cursor += 1
            return log.drop_steps[log.cursor - 1]
        index = self.drop_step + self._pending_drop_forwards
        if not self.config.sync_free:
            index = int(index)
        if log is not None:
            log.drop_steps.append(index)
        return index

    # -------------------------------------------------------------- balancing
    @torch.no_grad()
    def update_bias(self) -> None:
        """Close an applied optimizer step: V3 aux-free bias step from the pending loads, ``drop_step`` advanced.

        Call once per optimizer step, after the optimizer applied it (every
        micro-batch's loads count). Loads are already global (all-reduced over
        every rank in forward), so every rank applies the same update and the
        bias stays bitwise identical. ``drop_step`` grows by the step's
        training forwards that applied a capacity.
        """
        if self.config.aux_free_bias:
            self.router.update_bias(self.load_accum)
        self.drop_step += self._pending_drop_forwards
        self.discard_pending()

    @torch.no_grad()
    def discard_pending(self) -> None:
        """Close a step the optimizer skipped (fp16 overflow): its loads and capacity forwards are forgotten.

        The bias and ``drop_step`` stay as they were, so the step that
        follows routes and protects as the skipped one did.
        """
        self.load_accum.zero_()
        self._pending_drop_forwards.zero_()

    # -------------------------------------------------------------- placement
    def plan(self, load_E: torch.Tensor) -> Placement:
        """The placement ``moe_ep.eplb.plan_placement`` makes for logical loads ``load_E`` (same on every rank
        for the same loads): ``n_routed_experts + redundant_experts`` slots over this layer's EP group, the
        groups of ``placement_groups`` kept whole on one node."""
        cfg, parallel = self.config, self.parallel
        E = cfg.n_routed_experts
        phy2log_P = plan_placement(load_E, E + cfg.redundant_experts, placement_groups(cfg, parallel.nodes),
                                   parallel.nodes, parallel.ep_size)
        return Placement(phy2log_P, E, parallel.ep_size, parallel.nodes)

    def set_placement(self, placement: Optional[Placement], optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Hold the experts in ``placement``'s slots (None: one per expert, expert e on EP rank ``e // (E / ep)``).

        Collective over the EP group: the weights, and ``optimizer``'s moments of them, move to their new
        slots by all-to-all (``moe_ep.eplb.move``); gradients are dropped (call it between steps). The
        outputs and gradients of the logical experts do not change, only where pairs are computed.
        """
        if placement is not None and self.config.sync_free:
            raise ValueError(f"MoELayer {self.name!r}: sync_free=True layers hold one slot per expert in id order; "
                             f"a placement is not available with them")
        if placement is not None and (placement.n_experts, placement.n_ranks, placement.n_nodes) != \
                (self.config.n_routed_experts, self.parallel.ep_size, self.parallel.nodes):
            raise ValueError(f"MoELayer {self.name!r}: a placement of {placement.n_experts} experts over "
                             f"{placement.n_ranks} ranks and {placement.n_nodes} nodes does not fit this layer "
                             f"({self.config.n_routed_experts} experts, ep {self.parallel.ep_size}, "
                             f"{self.parallel.nodes} nodes)")
        new_P = placement.phy2log_P if placement is not None else torch.arange(self.config.n_routed_experts)
        move_expert_slots(self.experts, self.phy2log(), new_P, self.parallel, optimizer)
        self.placement = placement
        self.dispatcher = self._make_dispatcher()

    def _make_dispatcher(self):
        """The dispatcher of this layer's config and current placement."""
        cfg = self.config
        return make_dispatcher(cfg.dispatcher, self.parallel, cfg.n_routed_experts, chunks=cfg.overlap_chunks,
                               placement=self.placement, sync_free=cfg.sync_free)

    def phy2log(self) -> torch.Tensor:
        """The logical expert of every slot of the EP group, rank-major (``arange(E)`` without a placement)."""
        return torch.arange(self.config.n_routed_experts) if self.placement is None else self.placement.phy2log_P

    def local_expert_ids(self) -> torch.Tensor:
        """The logical expert held in each of this rank's slots (the rows of ``experts.w_in``), int64."""
        if self.placement is None:
            return torch.arange(*self.parallel.expert_range(self.config.n_routed_experts))
        return self.placement.local(self.parallel.ep_rank)

    # ------------------------------------------------------------ checkpoints
    def full_state_dict(self) -> dict:
        """Unsharded state dict with global expert indices (collective over the EP group).

        Keys and shapes equal those of the single-process layer's ``state_dict()`` (the logical experts,
        each read from its first slot under a placement).
        """
        out = {}
        for name, tensor in self.state_dict().items():
            if name.startswith("experts."):
                tensor = self.parallel.all_gather_ep(tensor)
                if self.placement is not None:
                    tensor = tensor[self.placement.slots_EC[:, 0]]
            out[name] = tensor.detach().clone()
        return out

    def load_full_state_dict(self, state_dict: dict) -> None:
        """Load an unsharded state dict; each rank keeps the experts of its own slots."""
        ids = self.local_expert_ids()
        local = {name: (t[ids] if name.startswith("experts.") else t) for name, t in state_dict.items()}
        self.load_state_dict(local)

"""Router replay: record the experts every MoE layer chose, and make a later forward use exactly those.

Reinforcement-learning pipelines roll out with one engine and train with
another; routing that differs between the two destabilises training
(Megatron-LM #4168: about 94 % of tokens differ in at least one layer). So::

    with moe_ep.record_routing(model) as rec:          # the rollout's forward(s)
        model(ids)
    torch.save(rec.experts, "routing.pt")               # plain int32 tensors, one per layer
    with moe_ep.replay_routing(model, torch.load("routing.pt")):
        loss = ce(model(ids), labels)                   # the training forward routes as the rollout did
    loss.backward()

**What is recorded.** ``rec.experts[path]`` is an int32 ``[N, K]`` tensor
per MoE layer, keyed by the layer's module path in ``model``
(``layers.1.ffn``): row ``n`` holds the K expert ids (global ids, the
router's order) token ``n`` was routed to, before any dropping. Tokens are
numbered per layer in call order: the forwards inside the context one after
the other, and inside one forward the rows of the layer's input flattened to
``[T, H]`` (batch-major: sequence ``b``, position ``s`` is ``b * S + s``).
Every forward inside the context counts, eval ones included; an activation
checkpointing recomputation is not a forward (it replays its own, below).
The tensors are filled when the context exits.

**Expert parallelism.** Each rank records and replays the tokens of its
own input (its data shard), with global expert ids: the record of rank r
holds rank r's tokens. A one-process record of the concatenated batch
replays at ep N when each rank is given the rows of its own sequences
(``tests/parallel/test_replay.py``).

**Replay.** Inside ``replay_routing(model, record)`` each forward of a
layer takes the next T rows of its tensor as its experts instead of the
router's top-K (``moe_ep.router.select_experts``). The router still runs:
its logits give the gate values ``s.gather(idx)`` (normalised and scaled as
configured), so the router keeps its gradient; the balance losses, routing
statistics and V3 bias loads count the replayed experts; capacities and
dropping apply to them as usual. Under activation checkpointing the
recomputation uses the experts its first forward used, even after the
context exited (``MoELayer``'s ``ReplayLog``). Contexts nest: a record
inside a replay records the replayed experts, a record inside a record
leaves the enclosing one every forward too, and an inner replay takes over
until it exits.

**Errors.** ``RoutingReplayError`` (a ``ValueError``) names the layer and
the shapes: on entry, when the record's layers differ from the model's, or
a tensor is not ``[N, K]`` integers in ``[0, n_routed_experts)``; at a
forward whose T tokens exceed the rows left; at exit (without another error
in flight), when rows are left over. At ep > 1 the error is raised on the
rank whose record does not fit; the other ranks then fail at the collective
timeout (``moe_ep.parallel.timeout``) unless theirs fails too.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Union

import torch
from torch import nn

from .layer import MoELayer


class RoutingReplayError(ValueError):
    """A routing record that does not fit the model or the batch it is replayed on (the message names the layer)."""


@dataclass
class RoutingRecord:
    """The experts each MoE layer chose: ``experts[path]`` int32 ``[N, K]`` (module docstring)."""

    experts: dict[str, torch.Tensor] = field(default_factory=dict)


def _layers(model: nn.Module) -> dict[str, MoELayer]:
    """Module path -> ``MoELayer`` for every MoE layer of ``model`` (the record's keys)."""
    return {path: module for path, module in model.named_modules() if isinstance(module, MoELayer)}


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecord]:
    """Record the experts every MoE layer of ``model`` chooses in the forwards inside (module docstring)."""
    layers = _layers(model)
    pending = {path: [] for path in layers}
    previous = {path: layer.routing_record for path, layer in layers.items()}
    record = RoutingRecord()
    for path, layer in layers.items():
        layer.routing_record = pending[path]
    try:
        yield record
    finally:
        for path, layer in layers.items():
            layer.routing_record = previous[path]
            if previous[path] is not None:  # an enclosing record gets these forwards too, in order
                previous[path].extend(pending[path])
            chosen = pending[path] or [torch.empty(0, layer.config.num_experts_per_tok, dtype=torch.int32)]
            record.experts[path] = torch.cat([idx.to(torch.int32) for idx in chosen])


class _Rows:
    """One layer's replayed experts, handed out ``T`` rows at a time in call order."""

    def __init__(self, path: str, layer: MoELayer, experts: torch.Tensor):
        K, E = layer.config.num_experts_per_tok, layer.config.n_routed_experts
        if experts.dim() != 2 or experts.shape[1] != K or experts.dtype.is_floating_point or \
                experts.dtype.is_complex or experts.dtype == torch.bool:
            raise RoutingReplayError(f"replay_routing: layer {path!r} routes {K} experts per token; its record "
                                     f"must be integers [N, {K}], got {experts.dtype} {tuple(experts.shape)}")
        if experts.numel() and not (0 <= int(experts.min()) and int(experts.max()) < E):
            raise RoutingReplayError(f"replay_routing: layer {path!r} has {E} experts; its record holds ids in "
                                     f"[{int(experts.min())}, {int(experts.max())}]")
        self.path = path
        self.experts = experts.to(device=layer.router.weight.device, dtype=torch.long)
        self.used = 0

    def __call__(self, T: int) -> torch.Tensor:
        left = self.experts.shape[0] - self.used
        if T > left:
            raise RoutingReplayError(f"replay_routing: layer {self.path!r}: a forward of {T} tokens, but the "
                                     f"record has {left} of its {self.experts.shape[0]} tokens left (recorded on "
                                     f"a batch of another shape?)")
        self.used += T
        return self.experts[self.used - T:self.used]


@contextlib.contextmanager
def replay_routing(model: nn.Module, record: Union[RoutingRecord, Mapping[str, torch.Tensor]]) -> Iterator[None]:
    """Make every MoE layer of ``model`` route the forwards inside as ``record`` says (module docstring).

    ``record``: a ``RoutingRecord`` or its ``experts`` mapping (e.g. loaded with ``torch.load``).
    """
    experts = record.experts if isinstance(record, RoutingRecord) else record
    layers = _layers(model)
    missing, unknown = sorted(set(layers) - set(experts)), sorted(set(experts) - set(layers))
    if missing or unknown:
        raise RoutingReplayError(f"replay_routing: the record's layers differ from the model's MoE layers: "
                                 f"missing {missing}, unknown {unknown}")
    rows = {path: _Rows(path, layer, experts[path]) for path, layer in layers.items()}
    previous = {path: layer.routing_replay for path, layer in layers.items()}
    for path, layer in layers.items():
        layer.routing_replay = rows[path]
    try:
        yield
    finally:
        for path, layer in layers.items():
            layer.routing_replay = previous[path]
    left = {path: r.experts.shape[0] - r.used for path, r in rows.items() if r.used < r.experts.shape[0]}
    if left:
        raise RoutingReplayError(f"replay_routing: the forwards inside used fewer tokens than recorded "
                                 f"(tokens left per layer: {left}; recorded on a batch of another shape?)")

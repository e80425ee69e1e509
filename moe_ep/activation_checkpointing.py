"""Activation checkpointing of whole transformer blocks, with MoE layers that count nothing twice.

``torch.utils.checkpoint`` (non-reentrant) keeps only a block's inputs in the
forward and recomputes the block in backward. An ``MoELayer`` has state that
a forward changes (aux loss, routing statistics, pending loads and drop step,
forward count) and a routing that depends on the drop step; the
recomputation must change none of it and must route and drop exactly as the
first forward did. So, through checkpoint's ``context_fn`` (two contexts
made per checkpointed call), the first forward runs inside
``MoELayer.recording(log)`` and the recomputation inside
``MoELayer.recomputing(log)`` with the same ``ReplayLog``: the layer replays
the drop steps that forward used and leaves its state alone, however many
forwards ran in between. Router noise replays too: checkpoint restores the
RNG state of the first forward. ``early_stop=False`` makes the
recomputation run the whole block, so every rank makes every collective of
the block again, whatever tensors backward needs first.

Compared with ``MoEConfig.recompute_experts`` (the routed experts keep no
pre-activations and recompute them, one extra grouped GEMM): checkpointing a
block keeps only its input and recomputes everything in it, attention,
router, dispatch (its all-to-alls again) and experts.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

from torch import nn
from torch.utils.checkpoint import checkpoint

from .layer import MoELayer, ReplayLog
from .model_moe import moe_layers


class _Each:
    """Enters the contexts ``make()`` returns, anew each time it is entered: a recomputation can run more than
    once (zero-bubble pipeline schedules back-propagate a stage twice, for its inputs and then its weights)."""

    def __init__(self, make: Callable[[], list[ContextManager]]):
        self._make, self._open = make, []

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        for context in self._make():
            stack.enter_context(context)
        self._open.append(stack)

    def __exit__(self, *exc) -> bool:
        return self._open.pop().__exit__(*exc)


def checkpoint_kwargs(layers: list[MoELayer]) -> dict:
    """Keyword arguments of ``torch.utils.checkpoint.checkpoint`` for a region holding ``layers``.

    Non-reentrant; ``context_fn``: every layer ``recording`` in the forward
    and ``recomputing`` in each recomputation, with one new ``ReplayLog`` per
    layer and call; no early stop (module docstring).
    """
    def context_fn() -> tuple[ContextManager, ContextManager]:
        logs = [ReplayLog() for _ in layers]
        return (_Each(lambda: [layer.recording(log) for layer, log in zip(layers, logs)]),
                _Each(lambda: [layer.recomputing(log) for layer, log in zip(layers, logs)]))

    return dict(use_reentrant=False, context_fn=context_fn, early_stop=False)


def checkpoint_block(block: nn.Module, *args) -> Any:
    """``block(*args)`` keeping only its inputs for backward; its MoE layers replay in the recomputation."""
    return checkpoint(block, *args, **checkpoint_kwargs(moe_layers(block)))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every transformer block of ``model`` in training forwards (module docstring).

    ``MoETransformerLM``: its ``activation_checkpointing`` switch. A
    transformers model (``--hf-model``): its own ``activation_checkpointing_enable``
    with ``checkpoint_kwargs`` of all its MoE layers (one block recomputes at
    a time, so marking every layer marks the block's). Raises ``TypeError``
    for any other model.
    """
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = True
    elif callable(getattr(model, "activation_checkpointing_enable", None)):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs(moe_layers(model)))
    else:
        raise TypeError(f"enable_activation_checkpointing: {type(model).__name__} has neither an "
                        f"activation_checkpointing switch (MoETransformerLM) nor activation_checkpointing_enable "
                        f"(a transformers model)")

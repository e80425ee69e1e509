"""DualPipeV's overlapped forward and backward: the ``OVERLAP_F_B`` action of torch's ``ScheduleDualPipeV``.

In DualPipeV's steady state each rank runs the forward of one micro-batch on one of its stages together
with the backward of another micro-batch on its other stage (torch's action ``OVERLAP_F_B``, whose
sub-actions are that ``FORWARD`` and that ``FULL_BACKWARD``). Without a function registered for it, torch
runs the two one after the other. ``overlapped_forward_backward`` runs them as the two parties of
``moe_ep.parallel.turns``: the forward on this thread, the backward on another, handing the turn over at
every all-to-all wait of the MoE layers (dispatch and combine, each of the layer's ``overlap_chunks``
chunks, each hop), so the all-to-all of one hides behind the compute of the other, as DeepSeek-V3 does.

Each sub-action does what torch's runtime does for it (``_PipelineScheduleRuntime._step_microbatches``):

    FORWARD f, micro-batch m      wait for the input received from the previous stage (unless that stage
                                  is on this rank), forward_one_chunk, the loss on the last stage, hand
                                  the output to the next stage when it is on this rank
    FULL_BACKWARD b, micro-batch n wait for the gradient received from the next stage (unless on this
                                  rank), backward_one_chunk (last_backward at the stage's last micro-batch),
                                  hand the input gradient to the previous stage when it is on this rank

Both receives are waited for before either party starts: they were posted before this action and never
depend on it, so nothing waits on the other party inside a turn but the MoE all-to-alls of one expert-
parallel group, which every rank of that group meets in the same order. The arithmetic is that of the
sequential pair; only the order of independent work changes, so the step's results are the same.
"""
from __future__ import annotations

from torch.distributed.pipelining.schedules import _Action, _PipelineContext, _wait_batch_p2p

from ..parallel.turns import run_in_turns


def overlapped_forward_backward(action: _Action, ctx: _PipelineContext) -> None:
    """Run ``action``'s ``FORWARD`` and ``FULL_BACKWARD`` sub-actions overlapped (module docstring); register
    with ``schedule.register_custom_function(OVERLAP_F_B, overlapped_forward_backward)``."""
    schedule = ctx.schedule_ref
    stages = {stage.stage_index: stage for stage in schedule._stages}
    forward, backward = action.sub_actions
    f_stage, f_mb = stages[forward.stage_index], forward.microbatch_index
    b_stage, b_mb = stages[backward.stage_index], backward.microbatch_index
    if not f_stage.is_first and forward.stage_index - 1 not in stages:
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((forward.stage_index, f_mb)))
    if not b_stage.is_last and backward.stage_index + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((backward.stage_index, b_mb)))

    def run_forward() -> None:
        output = f_stage.forward_one_chunk(f_mb, ctx.arg_mbs[f_mb], ctx.kwarg_mbs[f_mb])
        schedule._maybe_compute_loss(f_stage, output, ctx.target_mbs, f_mb)
        if forward.stage_index + 1 in stages:
            stages[forward.stage_index + 1].set_local_fwd_input(output, f_mb)

    def run_backward() -> None:
        schedule.backward_counter[backward.stage_index] += 1
        last = schedule.backward_counter[backward.stage_index] == schedule._n_microbatches
        b_stage.backward_one_chunk(b_mb, loss=schedule._maybe_get_loss(b_stage, b_mb), full_backward=True,
                                   last_backward=last)
        if backward.stage_index - 1 in stages:
            stages[backward.stage_index - 1].set_local_bwd_input(b_stage.get_local_bwd_output(b_mb), b_mb)

    if schedule._has_backward:
        run_in_turns(run_forward, run_backward)
    else:  # a forward-only pass (eval): the backward does nothing
        run_forward()
        run_backward()

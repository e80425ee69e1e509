"""Pipeline schedules as action lists, replayed with given action times; the papers' bubble formulas.

``bench_pipeline.py`` checks measured CPU pipelines against both; ``project_training.py`` projects a whole
training step with them. Nothing here runs a model or needs a process group.

**Action lists** are torch's own (``torch.distributed.pipelining``): ``schedule.pipeline_order`` of a built
multi-stage schedule, or ``torch_order(name, P, m)``: for DualPipeV the class's order generator called on a bare
instance (no stages, no process group; private torch API, pinned by constraints.txt), for GPipe and 1F1B the
order their ``_step_microbatches`` runs (``single_stage_order``). An action is normalised to
``(kind, stage, micro-batch, sub-actions)`` with kind F (forward), B (full backward), I (backward for the
input), W (backward for the weights) or FB (torch's ``OVERLAP_F_B``: a forward and a backward of two
micro-batches, ``sub`` lists them).

**Replay** (``replay``): each rank runs its actions in list order; an action starts when its rank is free and
its inputs exist, and takes ``duration(action)`` seconds:

    F(s, i)       after F(s-1, i)
    B/I(s, i)     after B/I(s+1, i) (the last stage: after F(s, i))
    W(s, i)       after I(s, i)
    FB            after the inputs of both sub-actions; one block of its own duration, or, when that is
                  None, its sub-actions one after the other

Transfers between stages take no time. Per rank ``idle = makespan - busy`` and the bubble fraction is
``idle / makespan`` (makespan: first start to last end over all ranks).

**The papers' bubbles** (``paper_bubble``), as time and as a fraction of the makespan
``bubble / (bubble + work per rank)``, with p ranks, m micro-batches and per-stage (per-chunk where a rank
holds two) times F, B (full backward), W (its weight part), FB (an overlapped forward+backward pair):

    gpipe, 1f1b         (p-1)(F+B);  fraction (p-1)/(m+p-1)         GPipe; DualPipe README, row 1F1B
    interleaved-1f1b    (p-1)(F+B) in chunk times (= stage times / v); fraction (p-1)/(v m + p-1)
                        (Narayanan et al. 2021, Megatron-LM's interleaved schedule: (p-1)/m shrunk v-fold)
    zbv                 0 when T_F = T_B = T_W (sail-sg/zero-bubble-pipeline-parallelism README, ZBV column);
                        the repositories cited give no closed form for unequal times: use the replay
    dualpipev           (P-1)(FB + B - 3W) in chunk times: the DualPipe README's (PP/2-1)(F&B+B-3W) for
                        DualPipe on PP = 2P ranks, of which DualPipeV ("cut in half") runs the V-shaped half
                        on P ranks; FB = F + B without the overlapped forward+backward
"""
from __future__ import annotations

from typing import Callable, Optional

KINDS = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W", "OVERLAP_F_B": "FB"}
STAGES_PER_RANK = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2, "zbv": 2, "dualpipev": 2}


def normalise(action) -> Optional[tuple]:
    """A torch ``_Action`` as ``(kind, stage, micro-batch, sub-actions)``; None for no-ops and non-compute actions."""
    if action is None:
        return None
    kind = KINDS.get(action.computation_type.name)
    if kind is None:
        return None
    sub = tuple(normalise(a) for a in action.sub_actions) if action.sub_actions else ()
    return kind, action.stage_index, action.microbatch_index, sub


def normalise_order(order: dict) -> dict[int, list[tuple]]:
    """``schedule.pipeline_order`` (rank -> torch actions) as rank -> normalised compute actions."""
    return {int(rank): [a for a in map(normalise, actions) if a is not None] for rank, actions in order.items()}


def single_stage_order(schedule: str, ranks: int, micro_batches: int) -> dict[int, list[tuple]]:
    """The order in which torch's ``ScheduleGPipe`` / ``Schedule1F1B`` run their actions (their
    ``_step_microbatches``): GPipe every forward, then every backward; 1F1B on rank r ``min(m, p - r)`` forwards,
    then backward and forward alternating, then the remaining backwards. (Their ``pipeline_order`` attribute is
    only drawn, and in torch 2.13 its last rank starts at micro-batch 1: not used.)"""
    order = {}
    for r in range(ranks):
        fwd = [("F", r, i, ()) for i in range(micro_batches)]
        bwd = [("B", r, i, ()) for i in range(micro_batches)]
        if schedule == "gpipe":
            order[r] = fwd + bwd
            continue
        warmup = min(micro_batches, ranks - r)
        acts = fwd[:warmup]
        for i in range(micro_batches):
            acts.append(bwd[i])
            if warmup + i < micro_batches:
                acts.append(fwd[warmup + i])
        order[r] = acts
    return order


def torch_order(schedule: str, ranks: int, micro_batches: int) -> dict[int, list[tuple]]:
    """torch's action lists of ``schedule`` ("gpipe", "1f1b", "dualpipev") for ``ranks`` x ``micro_batches``:
    ``single_stage_order`` for the first two, for DualPipeV the class's generator on a bare instance (module
    docstring)."""
    if schedule in ("gpipe", "1f1b"):
        return single_stage_order(schedule, ranks, micro_batches)
    if schedule == "dualpipev":
        from torch.distributed.pipelining import ScheduleDualPipeV

        if micro_batches < 2 * ranks:
            raise ValueError(f"DualPipeV needs at least {2 * ranks} micro-batches on {ranks} ranks")
        bare = object.__new__(ScheduleDualPipeV)
        bare.pp_group_size, bare._n_microbatches = ranks, micro_batches
        return normalise_order({r: bare._calculate_single_rank_operations(r) for r in range(ranks)})
    raise ValueError(f"torch_order: no bare generator for {schedule!r} (use a built schedule's pipeline_order)")


def _inputs(action: tuple, n_stages: int) -> list[tuple]:
    """Keys of the finished actions ``action`` needs: ("F", s, i) or ("G", s, i) (input gradient of s)."""
    kind, s, i, sub = action
    if kind == "FB":
        return [key for a in sub for key in _inputs(a, n_stages)]
    if kind == "F":
        return [("F", s - 1, i)] if s > 0 else []
    if kind in ("B", "I"):
        return [("F", s, i)] if s == n_stages - 1 else [("G", s + 1, i)]
    return [("I", s, i)]  # W


def _outputs(action: tuple) -> list[tuple]:
    kind, s, i, sub = action
    if kind == "FB":
        return [key for a in sub for key in _outputs(a)]
    return {"F": [("F", s, i)], "B": [("G", s, i)], "I": [("G", s, i), ("I", s, i)], "W": []}[kind]


def replay(order: dict[int, list[tuple]], duration: Callable[[tuple], Optional[float]]) -> dict:
    """Replay normalised action lists (module docstring): ``{"makespan", "ranks": {rank: {busy, idle, bubble}},
    "bubble", "spans"}`` (``bubble``: the mean over ranks of idle / makespan; ``spans``: each rank's
    (action, start, end)). ``duration(action)`` gives an action's seconds; for an FB action None means its
    sub-actions one after the other."""
    n_stages = 1 + max(a[1] if a[0] != "FB" else max(s[1] for s in a[3]) for acts in order.values() for a in acts)
    done: dict[tuple, float] = {}
    free = {r: 0.0 for r in order}
    nxt = {r: 0 for r in order}
    spans: dict[int, list] = {r: [] for r in order}

    def seconds(action: tuple) -> float:
        value = duration(action)
        if value is None and action[0] == "FB":
            return sum(seconds(a) for a in action[3])
        return value

    remaining = sum(len(a) for a in order.values())
    while remaining:
        progressed = False
        for r, actions in order.items():
            while nxt[r] < len(actions):
                action = actions[nxt[r]]
                needs = _inputs(action, n_stages)
                if any(key not in done for key in needs):
                    break
                start = max([free[r]] + [done[key] for key in needs])
                end = start + seconds(action)
                for key in _outputs(action):
                    done[key] = end
                free[r] = end
                spans[r].append((action, start, end))
                nxt[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: order[r][nxt[r]] for r in order if nxt[r] < len(order[r])}
            raise ValueError(f"replay: the action lists deadlock at {stuck}")
    makespan = max(free.values())
    ranks = {}
    for r, items in spans.items():
        busy = sum(end - start for _, start, end in items)
        ranks[r] = dict(busy=busy, idle=makespan - busy, bubble=1 - busy / makespan if makespan else 0.0)
    return dict(makespan=makespan, ranks=ranks, bubble=sum(v["bubble"] for v in ranks.values()) / len(ranks),
                spans=spans)


def paper_bubble(schedule: str, p: int, m: int, F: float, B: float, W: float = 0.0,
                 FB: Optional[float] = None) -> dict:
    """The paper's bubble of ``schedule`` (module docstring): ``{"time", "fraction", "formula"}``. F, B, W are
    stage times (gpipe, 1f1b) or chunk times (two stages per rank); B is the full backward (input + weights)."""
    if schedule in ("gpipe", "1f1b"):
        t, work, formula = (p - 1) * (F + B), m * (F + B), "(p-1)(F+B); (p-1)/(m+p-1)"
    elif schedule == "interleaved-1f1b":
        v = STAGES_PER_RANK[schedule]
        t, work, formula = (p - 1) * (F + B), v * m * (F + B), "(p-1)(F+B)/v in stage times; (p-1)/(vm+p-1)"
    elif schedule == "zbv":
        t, work, formula = 0.0, 2 * m * (F + B), "0 when T_F = T_B = T_W"
    elif schedule == "dualpipev":
        fb = F + B if FB is None else FB
        t, work = max((p - 1) * (fb + B - 3 * W), 0.0), 2 * m * (F + B)
        formula = "(P-1)(F&B+B-3W) in chunk times"
    else:
        raise ValueError(f"paper_bubble: unknown schedule {schedule!r}")
    return dict(time=t, fraction=t / (t + work) if t + work else 0.0, formula=formula)

"""Pipeline parallelism on 4 processes: memory per stage and rank, step time and bubble of each schedule.

    python benchmarks/bench_pipeline.py --json docs/data/bench_pipeline_cpu.json --plot docs/img
    python benchmarks/bench_pipeline.py --quick          # toy model, 1 timed round (the smoke test's size)

One process group of 4 processes (gloo, ``run_on_ranks``) builds every row from the same model configuration
and seed, and runs their optimizer steps interleaved (``bench_measure.interleaved_samples``: A, B, C, A, B,
C, ...), so load changes on the shared machine hit every row alike. The rows:

    pp1 x dp2 x ep2      ``PlainTrainer``: the baseline at the same world (4 processes) and the same global
                         batch and micro-batch size (batch_size / 2 per rank, grad_accum M / 2)
    pp2 x ep2            ``PipelineTrainer`` with gpipe, 1f1b, interleaved-1f1b, zbv, dualpipev, and
                         dualpipev with ``overlap_fb=True`` when the trainer accepts that argument
    pp4 x ep1            ``PipelineTrainer`` with 1f1b: every rank one stage (memory P-fold at P = 4)

EP groups span 2 emulated nodes (``init_expert_parallel(nodes=2)``; one rank per node and EP group, so every
remote row crosses the inter-node link). Every timed step runs under **emulated links**
(``moe_ep.parallel.emulated_links``, docs/dispatch.md "Emulated links"): loopback gloo is nearly free, so each
expert-parallel collective is made to take latency + bytes / bandwidth. The speeds start from
``bench_overlap.link_speeds`` (DeepSeek-V3 cluster ratios of GEMM rate to NVLink / InfiniBand bandwidth, applied
to this CPU's GEMM rate) and are then scaled so that communication is about equal to compute (``--comm-ratio``,
default 1), as issue 25 asks:

    C   = a 1f1b step's compute per rank with the links off (union of its stage actions' intervals)
    S0  = its link transfer time under the reference speeds b0 (sum over collectives of end - start - latency)
    b   = b0 * S0 / (comm_ratio * C - n * latency)        (n collectives per step)

Pipeline point-to-point sends are not delayed (only EP collectives are emulated).

Per row and rank:

    params       bytes of this rank's parameters, expert (``partition_parameters``: the routed experts' shards)
                 and non-expert, per stage and per rank (a parameter two local stages share counted once)
    activations  peak bytes of the tensors autograd holds for backward (``torch.autograd.graph.
                 saved_tensors_hooks`` around each stage's forward; a storage counted once while any saved
                 reference to it lives; parameters not counted), per stage and in all, over one step (the
                 pipeline's loss on the last stage runs outside the stage forward and is not counted; at pp 1
                 the hooks cover the whole step)
    step         wall time of the optimizer step (barriers before and after), median of the rounds; CPU time
    bubble       per rank, 1 - busy / span over the schedule's run, busy = the union of its stage actions'
                 intervals (``forward_one_chunk``, ``backward_one_chunk``, ``backward_weight_one_chunk`` and
                 the OVERLAP_F_B function, timed by wrapping them), span = first start to last end over the
                 4 ranks; the mean over ranks, median over rounds. EP all-to-alls inside an action count as busy
    replay       the schedule's own action list replayed with the measured mean action times
                 (``pipeline_model.replay``): the bubble the schedule has with these times and free transfers
    paper        the paper's formula (``pipeline_model.paper_bubble``) with the measured mean F, B, W

All timings: 4 processes share 2 CPU cores and the links are emulated; ratios within one run are the numbers
to read, not absolute times.
"""
from __future__ import annotations

import argparse
import inspect
import json
import pathlib
import statistics
import time
from contextlib import nullcontext
from functools import partial

import torch

from bench_measure import _union_us, interleaved_samples, machine_description, over_ranks
from pipeline_model import normalise_order, paper_bubble, replay, single_stage_order

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zbv", "dualpipev")
MiB = 2 ** 20


# --------------------------------------------------------------------------------------------- configuration
def model_config(quick: bool):
    """The benchmarked model: DeepSeek-V3's MoE structure (``v3-mini``: sigmoid scores with the aux-free bias, 1
    shared + routed experts, top-8) at a CPU size, with greedy top-8 routing (node-limited routing ties the
    routing groups to the node count, which differs between the rows); ``quick``: the toy model of the smoke
    test."""
    from moe_ep.models import ModelConfig

    if quick:
        base = ModelConfig.preset("tiny")
        return base.replace(hidden_size=32, n_layers=4, n_heads=2, dense_intermediate_size=64, max_seq_len=16,
                            moe=base.moe.replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8))
    base = ModelConfig.preset("v3-mini")
    return base.replace(hidden_size=128, n_layers=8, n_heads=4, dense_intermediate_size=256, max_seq_len=64,
                        moe=base.moe.replace(hidden_size=128, moe_intermediate_size=128, n_routed_experts=16,
                                             topk_method="greedy"))


def overlap_supported() -> bool:
    """The pipeline trainer takes ``overlap_fb`` (DualPipeV with overlapped forward and backward)."""
    from moe_ep.training.pipeline import PipelineTrainer

    return "overlap_fb" in inspect.signature(PipelineTrainer.__init__).parameters


def row_specs(overlap: bool) -> list[dict]:
    """The rows of the module docstring: name, layout (pp, ep, nodes), schedule, overlap."""
    rows = [dict(name="pp1", pp=1, ep=2, nodes=2, schedule=None, overlap=False)]
    rows += [dict(name=s, pp=2, ep=2, nodes=2, schedule=s, overlap=False) for s in SCHEDULES]
    if overlap:
        rows.append(dict(name="dualpipev+overlap", pp=2, ep=2, nodes=2, schedule="dualpipev", overlap=True))
    rows.append(dict(name="pp4 1f1b", pp=4, ep=1, nodes=1, schedule="1f1b", overlap=False))
    return rows


def layout_name(row: dict, world: int) -> str:
    dp = world // (row["pp"] * row["ep"])
    return f"pp{row['pp']} x dp{dp} x ep{row['ep']}" if dp > 1 else f"pp{row['pp']} x ep{row['ep']}"


# ---------------------------------------------------------------------------------------------- measurement
class SavedBytes:
    """Live bytes of the tensors autograd saves for backward, per stage and in all, and their peaks.

    ``hooks(stage)`` is a ``saved_tensors_hooks`` context: each saved tensor's storage is counted when first
    saved and uncounted when the last saved reference to it is freed (a ``_Held`` wrapper's ``__del__``);
    storages of ``excluded`` (the parameters) are not counted.
    """

    def __init__(self, excluded: set[int]):
        self.excluded = excluded
        self.refs: dict[int, list] = {}  # storage pointer -> [references, bytes, stage]
        self.live: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.total = self.total_peak = 0

    def _pack(self, stage: int, t: torch.Tensor):
        if t.device.type == "meta" or t.is_sparse:
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr == 0 or ptr in self.excluded:
            return t
        entry = self.refs.get(ptr)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            self.refs[ptr] = [1, nbytes, stage]
            self.live[stage] = self.live.get(stage, 0) + nbytes
            self.total += nbytes
            self.peak[stage] = max(self.peak.get(stage, 0), self.live[stage])
            self.total_peak = max(self.total_peak, self.total)
        else:
            entry[0] += 1
        return _Held(t, ptr, self)

    def release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            del self.refs[ptr]
            self.live[entry[2]] -= entry[1]
            self.total -= entry[1]

    def hooks(self, stage: int):
        return torch.autograd.graph.saved_tensors_hooks(partial(self._pack, stage), _unpack)


class _Held:
    __slots__ = ("tensor", "ptr", "owner")

    def __init__(self, tensor: torch.Tensor, ptr: int, owner: SavedBytes):
        self.tensor, self.ptr, self.owner = tensor, ptr, owner

    def __del__(self):
        self.owner.release(self.ptr)


def _unpack(held):
    return held.tensor if isinstance(held, _Held) else held


class Recorder:
    """The intervals of one trainer's stage actions (``events``: kind, stage, micro-batch, start, end) and of its
    schedule runs; ``memory``: a ``SavedBytes`` to account the forwards in, or None."""

    def __init__(self):
        self.events: list[tuple] = []
        self.memory: SavedBytes | None = None

    def wrap(self, obj, name: str, kind, stage: int) -> None:
        """Replace ``obj.name`` by a version that records its interval (kind: a str or a function of the kwargs)."""
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            context = self.memory.hooks(stage) if self.memory is not None and name == "forward_one_chunk" \
                else nullcontext()
            start = time.perf_counter()
            with context:
                out = original(*args, **kwargs)
            label = kind if isinstance(kind, str) else kind(kwargs)
            micro = args[0] if args else None
            self.events.append((label, stage, micro, start, time.perf_counter()))
            return out

        setattr(obj, name, timed)


def instrument(trainer, recorder: Recorder) -> None:
    """Time every stage action of a ``PipelineTrainer`` and its OVERLAP_F_B function, if one is registered."""
    from torch.distributed.pipelining.schedules import OVERLAP_F_B

    for stage in trainer.pipeline_stages:
        index = stage.stage_index
        recorder.wrap(stage, "forward_one_chunk", "F", index)
        recorder.wrap(stage, "backward_one_chunk", lambda kw: "B" if kw.get("full_backward", True) else "I", index)
        recorder.wrap(stage, "backward_weight_one_chunk", "W", index)
    functions = getattr(trainer.schedule, "_comp_type_to_function_map", {})
    if OVERLAP_F_B in functions:
        original = functions[OVERLAP_F_B]

        def timed(action, ctx):
            start = time.perf_counter()
            original(action, ctx)
            recorder.events.append(("FB", -1, None, start, time.perf_counter()))
        functions[OVERLAP_F_B] = timed


def param_bytes(module: torch.nn.Module) -> dict:
    """Bytes of ``module``'s parameters: the routed experts' shards and the rest (``partition_parameters``)."""
    from moe_ep.gradients import partition_parameters

    replicated, experts = partition_parameters(module)
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    return dict(expert=size(experts), non_expert=size(replicated))


class Row:
    """One row's trainer on this rank, its batches and recorder."""

    def __init__(self, spec: dict, parallel, config, opts: dict, world: int):
        from moe_ep.models import MoETransformerLM
        from moe_ep.training import PlainTrainer, TrainConfig
        from moe_ep.training.pipeline import PipelineTrainer

        self.spec, self.parallel = spec, parallel
        pp = spec["pp"]
        # same global batch and micro-batch size in every row: batch_size * data ranks = opts batch * 2
        data_ranks = world // pp
        batch = opts["batch_size"] * 2 // data_ranks
        accum = opts["micro_batches"] * batch // opts["batch_size"]
        cfg = TrainConfig(steps=1000, batch_size=batch, seq_len=opts["seq_len"], grad_accum=accum, warmup_steps=1,
                          lr=1e-3, out_dir="/tmp/bench_pipeline_unused")
        self.global_tokens = batch * data_ranks * opts["seq_len"]
        self.micro_batches = accum
        self.recorder = Recorder()
        if spec["schedule"] is None:
            self.trainer = PlainTrainer(MoETransformerLM(config, parallel, seed=0), parallel, cfg)
            self.stages = {0: self.trainer.model}
        else:
            extra = dict(overlap_fb=True) if spec["overlap"] else {}
            self.trainer = PipelineTrainer(config, parallel, cfg, torch.device("cpu"), seed=0,
                                           schedule=spec["schedule"], **extra)
            self.stages = dict(self.trainer.model.stages)
            instrument(self.trainer, self.recorder)
        g = torch.Generator().manual_seed(parallel.data_rank)
        self.batches = [torch.randint(0, config.vocab_size, (batch, opts["seq_len"] + 1), generator=g)
                        for _ in range(4)]
        self.step_index = 0
        self.runs: list[dict] = []  # per timed step: schedule span, events, link figures

    def step(self, speeds: dict | None) -> dict:
        """One optimizer step (under the links when ``speeds``); its action intervals and link figures."""
        from moe_ep.parallel.links import emulated_links

        self.recorder.events = []
        batch = self.batches[self.step_index % len(self.batches)]
        context = emulated_links(**speeds) if speeds else nullcontext()
        schedule = getattr(self.trainer, "schedule", None)
        with context as links:
            start = time.perf_counter()
            if schedule is None and self.recorder.memory is not None:
                with self.recorder.memory.hooks(0):
                    self.trainer.train_step(batch, self.step_index)
            else:
                self.trainer.train_step(batch, self.step_index)
            end = time.perf_counter()
        self.step_index += 1
        events = self.recorder.events
        run = dict(start=min([e[3] for e in events], default=start), end=max([e[4] for e in events], default=end),
                   events=events)
        if links is not None:
            run.update(exposed_s=links.exposed_s, latency_s=links.latency_us * 1e-6, n_links=len(links.events),
                       link_s=sum(e[3] - e[2] for e in links.events))
        return run

    def memory_step(self) -> dict:
        """One step (links off) with the saved tensors accounted: peak bytes per stage and in all."""
        excluded = {p.untyped_storage().data_ptr() for p in self.trainer.model.parameters()}
        self.recorder.memory = SavedBytes(excluded)
        try:
            self.step(None)
            return dict(stages={str(k): v for k, v in self.recorder.memory.peak.items()},
                        rank=self.recorder.memory.total_peak)
        finally:
            self.recorder.memory = None


def busy_seconds(run: dict) -> float:
    """Union of a run's action intervals (seconds)."""
    return _union_us([(e[3], e[4]) for e in run["events"]])


def calibrate_links(row: Row, opts: dict) -> dict:
    """Link speeds with communication ``comm_ratio`` times the compute of ``row`` (module docstring)."""
    from bench_overlap import gemm_rate, link_speeds

    config = opts["config"]
    H, I, K, E = config["hidden"], config["ffn"], config["top_k"], config["experts"]
    micro_tokens = row.global_tokens // (opts["world"] // row.spec["pp"]) // row.micro_batches
    rate = gemm_rate(H, I, max(micro_tokens * K * row.spec["ep"] // E, 1))
    reference = link_speeds(rate, micro_tokens * K * 6 * H * I)
    compute_s = busy_seconds(row.step(None))
    run = row.step(reference)
    compute_s, transfer_s, n = over_ranks([compute_s, run["link_s"] - run["n_links"] * run["latency_s"],
                                           run["n_links"]], "mean")
    latency_s = reference["latency_us"] * 1e-6
    target = opts["comm_ratio"] * compute_s - n * latency_s
    if target < 0.5 * opts["comm_ratio"] * compute_s:  # latency alone would take the budget: drop it
        latency_s, target = 0.0, opts["comm_ratio"] * compute_s
    scale = transfer_s / target
    speeds = dict(intranode_GBps=reference["intranode_GBps"] * scale,
                  internode_GBps=reference["internode_GBps"] * scale, latency_us=latency_s * 1e6)
    return dict(speeds=speeds, reference=reference, gemm_gflops=rate / 1e9, compute_ms=compute_s * 1e3,
                reference_transfer_ms=transfer_s * 1e3, collectives=n)


def _serialisable_order(schedule) -> dict | None:
    order = getattr(schedule, "pipeline_order", None)
    if order is None or not hasattr(schedule, "_stages"):  # single-stage schedules: their drawn order is not run
        return None
    return {str(k): v for k, v in normalise_order(order).items()}


def run_rank(rank: int, world: int, opts: dict) -> dict:
    """Every row on this rank (module docstring): memory, calibration, interleaved timed steps."""
    import moe_ep
    from moe_ep.models import ModelConfig

    config = ModelConfig.from_dict(opts["model"])
    phases = [("start", time.perf_counter())]
    states = {}
    rows = []
    for spec in opts["rows"]:
        key = (spec["pp"], spec["ep"], spec["nodes"])
        if key not in states:
            states[key] = moe_ep.init_expert_parallel(ep_size=spec["ep"], nodes=spec["nodes"], pp_size=spec["pp"])
        torch.manual_seed(0)
        rows.append(Row(spec, states[key], config, opts, world))
    phases.append(("build", time.perf_counter()))
    for _ in range(opts["warmup"]):
        for row in rows:
            row.step(None)
    phases.append(("warmup", time.perf_counter()))
    reference = next(r for r in rows if r.spec["name"] == "1f1b")
    links = calibrate_links(reference, opts)
    phases.append(("calibrate", time.perf_counter()))
    steps = {row.spec["name"]: (lambda row=row: row.runs.append(row.step(links["speeds"]))) for row in rows}
    samples = interleaved_samples(steps, opts["iters"], 0, torch.device("cpu"))
    phases.append(("timed", time.perf_counter()))
    out = []
    for row in rows:
        memory = row.memory_step()
        pp_rank = row.parallel.pp_rank
        out.append(dict(
            name=row.spec["name"], pp_rank=pp_rank, ep_rank=row.parallel.ep_rank, stages=sorted(row.stages),
            params_stage={str(k): param_bytes(m) for k, m in row.stages.items()},
            params_rank=param_bytes(row.trainer.model), memory=memory, samples=samples[row.spec["name"]],
            runs=[dict(r, events=[list(e) for e in r["events"]]) for r in row.runs],
            global_tokens=row.global_tokens, micro_batches=row.micro_batches,
            order=_serialisable_order(getattr(row.trainer, "schedule", None)) if rank == 0 else None))
    phases.append(("memory", time.perf_counter()))
    links["phase_s"] = {name: t - phases[i][1] for i, (name, t) in enumerate(phases[1:])}
    return dict(rows=out, links=links, machine=machine_description(torch.device("cpu")) if rank == 0 else None)


# ------------------------------------------------------------------------------------------------- analysis
def measured_bubble(runs: list[dict]) -> list[float]:
    """Per rank, 1 - busy / span of one step's runs on every rank (span: first start to last end)."""
    start, end = min(r["start"] for r in runs), max(r["end"] for r in runs)
    clipped = lambda r: [(max(e[3], start), min(e[4], end)) for e in r["events"]]  # noqa: E731
    return [1 - _union_us(clipped(r)) / (end - start) for r in runs]


def mean_action_seconds(runs: list[dict]) -> dict:
    """Mean seconds per (kind, stage) over the runs; F/B/I/W inside an FB block are left out (their block is
    the action). Keys "F:0", "FB:-1", ..."""
    sums: dict[str, list] = {}
    for run in runs:
        blocks = [(e[3], e[4]) for e in run["events"] if e[0] == "FB"]
        for kind, stage, _, start, end in run["events"]:
            if kind != "FB" and any(a <= start and end <= b for a, b in blocks):
                continue
            sums.setdefault(f"{kind}:{stage}", []).append(end - start)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def chunk_times(means: dict) -> dict:
    """Mean F, B (full backward: B, else I + W), W over the stages, and FB when measured."""
    def avg(kind):
        vals = [v for k, v in means.items() if k.split(":")[0] == kind]
        return sum(vals) / len(vals) if vals else None
    F, B, I, W = avg("F"), avg("B"), avg("I"), avg("W")
    if B is None:
        B = (I or 0.0) + (W or 0.0)
    return dict(F=F or 0.0, B=B, W=W or 0.0, FB=avg("FB"))


def _replay_row(schedule: str, pp: int, m: int, order: dict | None, means: dict, overlap: bool) -> dict:
    """The row's action list replayed with its measured mean action times."""
    if order is None:
        order = single_stage_order(schedule, pp, m)
    else:
        order = {int(k): [(a[0], a[1], a[2], tuple(tuple(s) for s in a[3])) for a in acts]
                 for k, acts in order.items()}
    t = chunk_times(means)

    def duration(action: tuple):
        kind, stage = action[0], action[1]
        if kind == "FB":
            return means.get("FB:-1") if overlap else None
        value = means.get(f"{kind}:{stage}")
        if value is None:  # e.g. a B where only I and W were measured
            value = {"B": t["B"], "I": t["B"] - t["W"], "W": t["W"], "F": t["F"]}[kind]
        return value
    return replay(order, duration)


def analyse(results: list[dict], opts: dict) -> list[dict]:
    """One record per row: the tables' numbers (module docstring)."""
    records = []
    names = [r["name"] for r in results[0]["rows"]]
    for i, name in enumerate(names):
        per_rank = [res["rows"][i] for res in results]
        spec = next(s for s in opts["rows"] if s["name"] == name)
        step_s = max(statistics.median(w for w, _ in r["samples"]) for r in per_rank)
        cpu_s = max(statistics.median(c for _, c in r["samples"]) for r in per_rank)
        rec = dict(name=name, layout=layout_name(spec, opts["world"]), schedule=spec["schedule"],
                   overlap=spec["overlap"], pp=spec["pp"], ep=spec["ep"], micro_batches=per_rank[0]["micro_batches"],
                   global_tokens=per_rank[0]["global_tokens"], step_ms=step_s * 1e3, step_cpu_ms=cpu_s * 1e3,
                   step_samples_ms=[w * 1e3 for w, _ in per_rank[0]["samples"]],
                   tokens_per_s=per_rank[0]["global_tokens"] / step_s,
                   params=[dict(rank=k, pp_rank=r["pp_rank"], stages=r["stages"], **r["params_rank"],
                                per_stage=r["params_stage"]) for k, r in enumerate(per_rank)],
                   activations=[dict(rank=k, pp_rank=r["pp_rank"], peak=r["memory"]["rank"],
                                     per_stage=r["memory"]["stages"]) for k, r in enumerate(per_rank)])
        runs_by_round = list(zip(*[r["runs"] for r in per_rank]))
        rec["comm_ms"] = statistics.median(statistics.mean(r.get("link_s", 0) for r in rnd)
                                           for rnd in runs_by_round) * 1e3 if runs_by_round else 0.0
        rec["exposed_comm_ms"] = statistics.median(statistics.mean(r.get("exposed_s", 0) for r in rnd)
                                                   for rnd in runs_by_round) * 1e3 if runs_by_round else 0.0
        if spec["schedule"] is not None:
            bubbles = [measured_bubble(list(rnd)) for rnd in runs_by_round]
            rec["bubble_measured"] = statistics.median(statistics.mean(b) for b in bubbles)
            rec["bubble_measured_per_rank"] = [statistics.median(b[k] for b in bubbles) for k in range(len(per_rank))]
            rec["busy_ms"] = statistics.median(statistics.mean(busy_seconds(r) for r in rnd)
                                               for rnd in runs_by_round) * 1e3
            rec["schedule_ms"] = statistics.median(max(r["end"] for r in rnd) - min(r["start"] for r in rnd)
                                                   for rnd in runs_by_round) * 1e3
            means = mean_action_seconds([run for r in per_rank for run in r["runs"]])
            rec["action_ms"] = {k: v * 1e3 for k, v in means.items()}
            t = chunk_times(means)
            paper = paper_bubble(spec["schedule"], spec["pp"], rec["micro_batches"], t["F"], t["B"], t["W"],
                                 t["FB"] if spec["overlap"] else None)
            rec.update(bubble_paper=paper["fraction"], paper_formula=paper["formula"])
            rp = _replay_row(spec["schedule"], spec["pp"], rec["micro_batches"], results[0]["rows"][i]["order"],
                             means, spec["overlap"])
            rec.update(bubble_replay=rp["bubble"], replay_ms=rp["makespan"] * 1e3)
        records.append(rec)
    base = next((r for r in records if r["name"] == "1f1b"), None)
    for r in records:
        r["vs_1f1b"] = r["step_ms"] / base["step_ms"] if base else None
    return records


def memory_summary(records: list[dict]) -> list[dict]:
    """Per layout: the largest and the mean per-rank non-expert and expert parameter bytes, and their fall
    against pp 1 (pp1 / ppP)."""
    base = next(r for r in records if r["pp"] == 1)
    out = []
    for r in records:
        if r["name"] not in ("pp1", "1f1b", "dualpipev", "pp4 1f1b"):
            continue
        row = dict(name=r["name"], layout=r["layout"])
        for part in ("non_expert", "expert"):
            vals = [p[part] for p in r["params"]]
            ref = [p[part] for p in base["params"]]
            row[f"{part}_max"], row[f"{part}_mean"] = max(vals), sum(vals) / len(vals)
            row[f"{part}_fall_max"] = max(ref) / max(vals)
            row[f"{part}_fall_mean"] = (sum(ref) / len(ref)) / (sum(vals) / len(vals))
        out.append(row)
    return out


# -------------------------------------------------------------------------------------------------- output
def print_tables(records: list[dict], summary: list[dict], links: dict) -> None:
    s = links["speeds"]
    print(f"\nemulated links (EP collectives; pipeline sends not delayed): inter-node {s['internode_GBps'] * 1e3:.3f} "
          f"MB/s, intra-node {s['intranode_GBps'] * 1e3:.3f} MB/s, latency {s['latency_us']:.0f} us: calibrated so a "
          f"1f1b step's link time ({links['reference_transfer_ms']:.0f} ms at the reference speeds) equals its "
          f"compute ({links['compute_ms']:.0f} ms per rank); CPU GEMM rate {links['gemm_gflops']:.1f} GFLOP/s")
    print("\nParameters per rank (bytes -> MiB; max over ranks / mean; fall = pp1 / this)")
    print(f"{'row':<12}{'layout':<20}{'non-expert max':>15}{'mean':>8}{'fall':>7}{'expert max':>12}{'mean':>8}"
          f"{'fall':>7}")
    for m in summary:
        print(f"{m['name']:<12}{m['layout']:<20}{m['non_expert_max'] / MiB:>15.2f}{m['non_expert_mean'] / MiB:>8.2f}"
              f"{m['non_expert_fall_max']:>6.2f}x{m['expert_max'] / MiB:>12.2f}{m['expert_mean'] / MiB:>8.2f}"
              f"{m['expert_fall_max']:>6.2f}x")
    print("\nPer stage and rank: parameters (non-expert / expert MiB) and peak saved activations (MiB)")
    print(f"{'row':<20}{'rank':>5}{'pp':>4}  {'stages':<8}{'non-exp':>8}{'expert':>8}{'act peak':>9}  per stage "
          f"(non-exp/expert/act)")
    for r in records:
        for p, a in zip(r["params"], r["activations"]):
            stages = " ".join(f"s{k}:{v['non_expert'] / MiB:.2f}/{v['expert'] / MiB:.2f}/"
                              f"{a['per_stage'].get(k, 0) / MiB:.2f}" for k, v in p["per_stage"].items())
            print(f"{r['name']:<20}{p['rank']:>5}{p['pp_rank']:>4}  {','.join(map(str, p['stages'])):<8}"
                  f"{p['non_expert'] / MiB:>8.2f}{p['expert'] / MiB:>8.2f}{a['peak'] / MiB:>9.2f}  {stages}")
    print("\nStep time and bubble (emulated links; 4 processes share 2 CPU cores: read the ratios)")
    print(f"{'row':<20}{'layout':<18}{'m':>3}{'step ms':>9}{'cpu ms':>8}{'vs 1f1b':>8}{'tok/s':>8}{'comm ms':>9}"
          f"{'exposed':>9}{'bubble meas':>12}{'replay':>8}{'paper':>7}  formula")
    for r in records:
        b = lambda k: f"{100 * r[k]:.1f}%" if k in r else "-"  # noqa: E731
        print(f"{r['name']:<20}{r['layout']:<18}{r['micro_batches']:>3}{r['step_ms']:>9.0f}{r['step_cpu_ms']:>8.0f}"
              f"{r['vs_1f1b']:>8.2f}{r['tokens_per_s']:>8.0f}{r['comm_ms']:>9.0f}{r['exposed_comm_ms']:>9.0f}"
              f"{b('bubble_measured'):>12}{b('bubble_replay'):>8}{b('bubble_paper'):>7}  {r.get('paper_formula', '')}")
    print("\nMean action times (ms; kind:stage):")
    for r in records:
        if "action_ms" in r:
            print(f"  {r['name']:<20}" + "  ".join(f"{k} {v:.0f}" for k, v in sorted(r["action_ms"].items())))


def last_timelines(results: list[dict]) -> dict:
    """Per row, each rank's last timed run (its action intervals), for the timeline plot."""
    names = [r["name"] for r in results[0]["rows"]]
    return {name: [res["rows"][i]["runs"][-1] for res in results] for i, name in enumerate(names)
            if results[0]["rows"][i]["runs"]}


def plot(records: list[dict], timelines: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """bench_pipeline_memory.png (parameters and activations per rank), bench_pipeline_time.png (step time and
    bubble per schedule), bench_pipeline_timeline.png (one step's actions per rank, pp 2 schedules)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    mem_rows = [r for r in records if r["name"] in ("pp1", "gpipe", "1f1b", "zbv", "dualpipev", "pp4 1f1b")]
    fig, (ax_p, ax_a) = plt.subplots(1, 2, figsize=(13, 4.2))
    x, ticks, labels, groups = 0.0, [], [], []
    for r in mem_rows:
        first = x
        for p, a in zip(r["params"], r["activations"]):
            ax_p.bar(x, p["non_expert"] / MiB, color="tab:blue", label="non-expert" if x == 0 else None)
            ax_p.bar(x, p["expert"] / MiB, bottom=p["non_expert"] / MiB, color="tab:orange",
                     label="expert" if x == 0 else None)
            ax_a.bar(x, a["peak"] / MiB, color="tab:green")
            ticks.append(x)
            labels.append(f"r{p['rank']}")
            x += 1
        groups.append(((first + x - 1) / 2, r["name"]))
        x += 0.7
    for ax, title in ((ax_p, "parameters per rank (MiB)"), (ax_a, "peak saved activations per rank (MiB)")):
        ax.set_xticks(ticks, labels, fontsize=6)
        for centre, name in groups:
            ax.text(centre, -0.09, name, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    ax_p.legend(fontsize=8)
    fig.suptitle("bench_pipeline.py: memory per rank, 4 processes (CPU)", fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "bench_pipeline_memory.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 4.2))
    names = [r["name"] for r in records]
    ax_t.bar(range(len(records)), [r["step_ms"] for r in records], color="tab:blue")
    ax_t.set_xticks(range(len(records)), names, rotation=30, fontsize=7, ha="right")
    ax_t.set_ylabel("step ms (median)")
    ax_t.set_title("step time, emulated links, 4 processes on 2 cores", fontsize=9)
    piped = [r for r in records if "bubble_measured" in r]
    w = 0.27
    for k, (key, label) in enumerate((("bubble_measured", "measured"), ("bubble_replay", "replay of the schedule"),
                                      ("bubble_paper", "paper formula"))):
        ax_b.bar([i + (k - 1) * w for i in range(len(piped))], [100 * r[key] for r in piped], w, label=label)
    ax_b.set_xticks(range(len(piped)), [r["name"] for r in piped], rotation=30, fontsize=7, ha="right")
    ax_b.set_ylabel("bubble, % of the schedule's span")
    ax_b.legend(fontsize=8)
    for ax in (ax_t, ax_b):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "bench_pipeline_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    timeline_rows = [r for r in records if r["pp"] == 2 and r["schedule"] and r["name"] in timelines]
    fig, axes = plt.subplots(len(timeline_rows), 1, figsize=(12, 1.2 + 1.0 * len(timeline_rows)), squeeze=False)
    colors = {"F": "tab:blue", "B": "tab:red", "I": "tab:orange", "W": "tab:olive", "FB": "tab:purple"}
    for ax, r in zip(axes[:, 0], timeline_rows):
        runs = timelines[r["name"]]
        origin = min(run["start"] for run in runs)
        for rank, run in enumerate(runs):
            for kind, stage, micro, start, end in run["events"]:
                ax.broken_barh([((start - origin) * 1e3, (end - start) * 1e3)], (rank - 0.4, 0.8),
                               color=colors[kind], alpha=0.5 if kind == "FB" else 0.9)
        ax.set_yticks(range(len(runs)), [f"rank {k}" for k in range(len(runs))], fontsize=6)
        ax.set_title(f"{r['name']}: one step's stage actions (F blue, B red, I orange, W olive, F&B purple), "
                     f"emulated links", fontsize=8)
    axes[-1, 0].set_xlabel("ms from the first action")
    fig.tight_layout()
    paths.append(out_dir / "bench_pipeline_timeline.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy model, 4 micro-batches, 1 timed round, no warm-up")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per data rank at pp 2 (default 16)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=8, help="pipeline micro-batches M (default 8)")
    p.add_argument("--iters", type=int, default=3, help="timed interleaved rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first, links off (default 1)")
    p.add_argument("--comm-ratio", type=float, default=1.0, help="link time / compute of a 1f1b step (default 1)")
    p.add_argument("--no-overlap", action="store_true", help="leave out the dualpipev+overlap row")
    p.add_argument("--rows", nargs="+", default=None, metavar="NAME",
                   help="only these rows (pp1, gpipe, 1f1b, interleaved-1f1b, zbv, dualpipev, dualpipev+overlap, "
                        "'pp4 1f1b'); 1f1b is always run (it calibrates the links)")
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--plot", type=pathlib.Path, help="folder for the three PNGs")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--replot", type=pathlib.Path, metavar="JSON", help="only redraw --plot's PNGs from this JSON")
    args = p.parse_args(argv)
    if args.replot:
        data = json.loads(args.replot.read_text())
        for path in plot(data["records"], data["timelines"], args.plot or pathlib.Path("docs/img")):
            print(f"wrote {path}")
        return data
    if args.quick:
        args.batch_size, args.seq_len, args.micro_batches, args.iters, args.warmup = 4, 16, 4, 1, 0
    if args.micro_batches % 2 or args.batch_size % args.micro_batches:
        p.error("--micro-batches must be even and divide --batch-size")
    config = model_config(args.quick)
    overlap = overlap_supported() and not args.no_overlap
    rows = [r for r in row_specs(overlap) if args.rows is None or r["name"] in args.rows or r["name"] == "1f1b"]
    if args.rows is not None and not any(r["pp"] == 1 for r in rows):
        p.error("--rows must include pp1 (the baseline of the memory and time ratios)")
    opts = dict(model=config.to_dict(), rows=rows, batch_size=args.batch_size, seq_len=args.seq_len,
                micro_batches=args.micro_batches, iters=args.iters, warmup=args.warmup, comm_ratio=args.comm_ratio,
                world=4, config=dict(hidden=config.hidden_size, ffn=config.moe.moe_intermediate_size,
                                     top_k=config.moe.num_experts_per_tok, experts=config.moe.n_routed_experts))
    start = time.perf_counter()
    from moe_ep.parallel.spawn import run_on_ranks

    results = run_on_ranks(run_rank, 4, opts, timeout=args.timeout)
    records = analyse(results, opts)
    summary = memory_summary(records)
    links = results[0]["links"]
    print_tables(records, summary, links)
    if not overlap:
        print("\n(no dualpipev+overlap row: PipelineTrainer takes no overlap_fb argument yet)" if not args.no_overlap
              else "\n(dualpipev+overlap left out: --no-overlap)")
    wall = time.perf_counter() - start
    phase = ", ".join(f"{k} {v:.1f}" for k, v in links["phase_s"].items())
    print(f"\nwall time {wall:.0f} s (rank 0, seconds: {phase}); load average at the start "
          f"{results[0]['machine']['load_avg_1m']:.1f}")
    out = dict(opts={k: v for k, v in opts.items() if k != "rows"}, rows=opts["rows"], links=links,
               machine=results[0]["machine"], overlap_row=overlap, wall_s=wall, records=records,
               memory_summary=summary, timelines=last_timelines(results),
               note="4 processes share 2 CPU cores; EP collectives run under emulated links (pipeline sends do not)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        for path in plot(records, out["timelines"], args.plot):
            print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()

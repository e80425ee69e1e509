"""Pipeline parallelism (moe_ep/training/pipeline.py): adding ``pp_size`` 2 multiplies the world by 2 and changes
nothing else.

Four processes run every schedule (gpipe, 1f1b, interleaved-1f1b, zbv, dualpipev, and dualpipev with its
forward and backward overlapped) at pp 2 x ep 2 and at pp 2 x dp 2 x ep 1; two processes run the plain trainer
at ep 2 and at dp 2 x ep 1 with the same global batch and micro-batches (pipeline_workers.py). Per data rank:

* fp32, 10 steps: cross-entropy, aux loss, grad norm (over every stage) and the validation loss equal the
  pp 1 run's within 1e-5 relative; every layer's expert loads per micro-batch are equal (statistics gathered
  over the stages, in depth order);
* at pp 2 x ep 2 under 1f1b, zbv and dualpipev (both stage placements), activation checkpointing, 2 steps:
  the same within 1e-5; bf16, 2 steps: within 2e-3 (both
  runs autocast the same micro-batches; the stage boundary adds no rounding, but the order of accumulations
  may differ);
* dualpipev overlapped equals dualpipev within 1e-6 (losses and every weight after 10 steps), and its forward
  and backward did take turns at the all-to-alls.

A transformers DeepSeek-V3 model made expert-parallel and cut into stages (1f1b, and dualpipev overlapped)
equals its ep 2 run over 2 steps within 1e-5.

Checkpoints: the driver at pp 2 x ep 2 (1f1b) writes step 3 and runs on to step 6; resumed from step 3 at
pp 2 under dualpipev (the V stage placement), at pp 1 x ep 2 and at pp 1 x ep 1 (one process, no process
group), the losses of steps 4..6 equal the uninterrupted run's within 1e-5.
"""
import json
import math
from pathlib import Path

import pytest

from moe_ep.parallel.spawn import run_on_ranks

from . import pipeline_workers as workers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    workers.save_hf_model(str(root / "hf"))
    pipelined = run_on_ranks(workers.pipelined, 4, str(root), timeout=600)
    references = run_on_ranks(workers.references, 2, str(root), timeout=300)
    workers.resume_in_one_process(str(root))
    return root, pipelined, references


def close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=rel * 1e-2)


def assert_same_steps(got: list[dict], want: list[dict], rel: float, what: str) -> None:
    assert len(got) == len(want), what
    for step, (g, w) in enumerate(zip(got[:-1], want[:-1])):
        for key in ("ce", "aux", "grad_norm"):
            assert close(g[key], w[key], rel), (what, step, key, g[key], w[key])
        assert g["loads"] == w["loads"], (what, step, "expert loads")
    assert close(got[-1]["val"], want[-1]["val"], rel), (what, "val", got[-1]["val"], want[-1]["val"])


def check_layout(pipelined: list[dict], references: list[dict], layout: str, reference: str) -> None:
    for result in pipelined:
        ours, ref = result[layout], references[result["data_rank"]][reference]
        for schedule in ours:
            if schedule == "overlap_weight_diff":
                continue
            what = f"{layout} {schedule} (rank of pp {result['pp_rank']}, data rank {result['data_rank']})"
            assert_same_steps(ours[schedule]["fp32"], ref["fp32"], 1e-5, what + " fp32")
            if "ckpt" in ours[schedule]:
                assert_same_steps(ours[schedule]["ckpt"], ref["ckpt"], 1e-5, what + " activation checkpointing")
                assert_same_steps(ours[schedule]["bf16"], ref["bf16"], 2e-3, what + " bf16")


@pytest.mark.timeout(1200)
def test_every_schedule_at_pp2_x_ep2_equals_ep2(runs):
    _, pipelined, references = runs
    assert {r["pp_rank"] for r in pipelined} == {0, 1}
    for result in pipelined:
        assert {s for s, runs in result["pp2_ep2"].items() if isinstance(runs, dict) and "ckpt" in runs} == \
            set(workers.VARIANT_SCHEDULES)
    check_layout(pipelined, references, "pp2_ep2", "ep2")


@pytest.mark.timeout(1200)
def test_every_schedule_at_pp2_x_dp2_equals_dp2(runs):
    _, pipelined, references = runs
    check_layout(pipelined, references, "pp2_dp2", "dp2")


@pytest.mark.timeout(1200)
def test_dualpipev_overlapped_equals_dualpipev(runs):
    _, pipelined, _ = runs
    for result in pipelined:
        assert result["hand_overs"] > 0, "the overlapped forward and backward never took turns"
        plain, overlapped = result["pp2_ep2"]["dualpipev"], result["pp2_ep2"]["dualpipev+overlap"]
        assert_same_steps(overlapped["fp32"], plain["fp32"], 1e-6, "dualpipev overlapped")
        assert result["pp2_ep2"]["overlap_weight_diff"] <= 1e-6


@pytest.mark.timeout(1200)
def test_a_transformers_model_split_into_stages_equals_its_ep2_run(runs):
    _, pipelined, references = runs
    for result in pipelined:
        ref = references[result["data_rank"]]["hf"]
        for schedule, steps in result["hf"].items():
            assert_same_steps(steps, ref, 1e-5, f"transformers model, {schedule}")


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("layout", ["resumed_pp2_dualpipev", "resumed_pp1_ep2", "resumed_pp1_ep1"])
def test_a_pp2_checkpoint_resumes_at_any_layout(runs, layout):
    root, _, _ = runs
    reference, resumed = losses(root / "pp2_ep2"), losses(root / layout)
    assert sorted(resumed) == list(range(workers.RESUME_AT + 1, workers.CKPT_STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), (layout, step, loss, reference[step])

"""Resharding checkpoints (moe_ep/checkpoint): save at (world 4, ep 4), load and resume at other layouts.

One 4-process run (``source``) writes two checkpoints at (4, ep 4): one after
2 hand-made steps with the unsharded state it must hold (``exact``), and the
checkpoints of an uninterrupted ``train`` run (steps 3 and 6). Each target
layout, (4, dp 2 x ep 2) in the same processes, (2, ep 2) in 2 processes and
(1, ep 1) in this process without a process group, then

* loads ``exact``: weights, buffers and AdamW state must equal the reference
  bitwise;
* resumes the uninterrupted run from step 3 with the same global batch: the
  losses of steps 4..6 must equal the uninterrupted run's within 1e-5
  relative.

Every distributed run has a hard timeout (``run_on_ranks``).
"""
import json
from pathlib import Path

import pytest
import torch

from moe_ep.checkpoint import latest_checkpoint, read_manifest
from moe_ep.checkpoint.storage import read_metadata
from moe_ep.parallel.spawn import run_on_ranks

from . import checkpoint_workers as workers


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    results = run_on_ranks(workers.source_then_resume, 4, str(root), timeout=240)
    return root, results


def check_exact_load(result: dict) -> None:
    assert result["step"] == 2
    assert result["keys_equal"], "the loaded model / optimizer state has other keys than the saved one"
    assert result["differ"] == [], f"not bitwise equal after load: {result['differ'][:5]}"
    # every trained tensor of the fresh model was overwritten (the drop-step counters stay 0 without dropping)
    assert all(k.endswith("drop_step") for k in result["unchanged_by_load"]), result["unchanged_by_load"]


def check_resumed_losses(root: Path, world: int, ep_size: int) -> None:
    reference = losses(root / "uninterrupted")
    resumed = losses(root / f"resumed_w{world}_ep{ep_size}")
    assert sorted(resumed) == list(range(workers.RESUME_AT + 1, workers.STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), (step, loss, reference[step])


@pytest.mark.timeout(300)
def test_shards_are_written_once_by_their_owner(source):
    root, _ = source
    folder = root / "uninterrupted" / "ckpt" / f"step_{workers.RESUME_AT:04d}"
    manifest = read_manifest(folder)
    assert manifest["layout"] == dict(world_size=4, ep_size=4, dp_size=1)
    assert manifest["contents"] == ["model", "optimizer", "rng"]
    assert set(manifest["files"]) == {".metadata"} | {f"__{r}_0.distcp" for r in range(4)}
    metadata = read_metadata(folder)
    where = {}
    for index, info in metadata.storage_data.items():
        where.setdefault(index.fqn, []).append((tuple(index.offset), info.relative_path))
    sizes = {k: len(m.size) for k, m in metadata.state_dict_metadata.items()}
    expert_keys = [k for k in where if ".experts.w_" in k and sizes[k] == 3]
    assert len(expert_keys) == 2 * 2 * 3  # 2 MoE layers x 2 stacks x (weight, exp_avg, exp_avg_sq)
    for key in expert_keys:
        # one chunk of 2 experts per EP rank, written by that rank: no gather, no duplicate
        assert sorted(where[key]) == [((2 * r, 0, 0), f"__{r}_0.distcp") for r in range(4)], key
    for key, chunks in where.items():
        if key not in expert_keys:
            assert len(chunks) == 1, f"replicated tensor {key} written {len(chunks)} times"
    assert sum(k.startswith("rng.") for k in where) == 4


@pytest.mark.timeout(300)
def test_resume_at_dp2_x_ep2(source):
    root, results = source
    for result in results:
        check_exact_load(result)
    check_resumed_losses(root, 4, 2)


@pytest.mark.timeout(300)
def test_resume_at_ep2(source):
    root, _ = source
    for result in run_on_ranks(workers.resume_layout, 2, 2, str(root), timeout=180):
        check_exact_load(result)
    check_resumed_losses(root, 2, 2)


@pytest.mark.timeout(300)
def test_resume_in_one_process_without_process_group(source):
    root, _ = source
    check_exact_load(workers.resume_layout(0, 1, 1, str(root)))
    check_resumed_losses(root, 1, 1)
    assert latest_checkpoint(root / "resumed_w1_ep1").name == f"step_{workers.STEPS:04d}"

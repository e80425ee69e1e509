"""End-to-end training under torchrun (2 gloo processes) and the gradient convention.

One short run (``trained_run``) backs the metrics, plots and resume tests; the
resume test continues that run from its middle checkpoint in a fresh folder
and requires bitwise equal parameters and optimizer state at the end. Every
subprocess has a hard timeout and is killed with its whole process group.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_ep.parallel.spawn import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
STEPS, HALF = 60, 30
RUN_FLAGS = ["--preset", "tiny", "--ep-size", "1", "--steps", str(STEPS), "--batch-size", "8", "--seq-len", "128",
             "--warmup", "10", "--log-every", "10", "--val-every", "30", "--val-batches", "2",
             "--ckpt-every", str(HALF), "--max-data-bytes", str(2 << 20)]
RECORD_FIELDS = {"step", "loss", "aux_loss", "tokens_per_s", "dropped_frac", "max_vio", "grad_norm", "lr",
                 "expert_load", "routed_pairs", "processed_pairs", "dropped_pairs"}


def torchrun(args: list[str], timeout: float = 90.0) -> str:
    """Run launch/train.py on 2 processes; return its output, fail on error or timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "train.py"), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout}s (a hang?)\n{output[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{output[-4000:]}"
    return output


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    torchrun([*RUN_FLAGS, "--out", str(out)])
    return out


@pytest.mark.timeout(150)
def test_metrics_plots_and_checkpoints(trained_run):
    recs = records(trained_run)
    assert [r["step"] for r in recs] == list(range(0, STEPS + 1, 10))
    assert set(recs[0]) == {"step", "val_loss"}
    for rec in recs[1:]:
        assert RECORD_FIELDS <= set(rec), rec.keys()
        assert rec["tokens_per_s"] > 0 and 0 <= rec["dropped_frac"] <= 1 and rec["max_vio"] >= 0
        assert len(rec["expert_load"]) == 3 and all(len(row) == 16 for row in rec["expert_load"])
        # 10 steps x 2 ranks x 8 x 128 tokens x top-k 2 x 3 MoE layers; nothing lost
        assert rec["routed_pairs"] == 10 * 2 * 8 * 128 * 2 * 3
        assert rec["processed_pairs"] + rec["dropped_pairs"] == rec["routed_pairs"]
        assert sum(rec["expert_load"][0]) == pytest.approx(1.0, abs=1e-3)
    val = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    assert sorted(val) == [0, HALF, STEPS]
    assert val[STEPS] < val[0] - 1.5, val
    for name in ("loss.png", "expert_load.png"):
        assert (trained_run / name).stat().st_size > 10_000
    for step in (HALF, STEPS):
        folder = trained_run / "ckpt" / f"step_{step:04d}"
        assert {p.name for p in folder.iterdir()} == {"rank_0.pt", "rank_1.pt", "complete.json"}


@pytest.mark.timeout(150)
def test_resume_matches_uninterrupted_run(trained_run, tmp_path):
    resumed = tmp_path / "resumed"
    torchrun([*RUN_FLAGS, "--out", str(resumed), "--resume", str(trained_run / "ckpt" / f"step_{HALF:04d}")])
    for rank in (0, 1):
        a = torch.load(trained_run / "ckpt" / f"step_{STEPS:04d}" / f"rank_{rank}.pt", weights_only=True)
        b = torch.load(resumed / "ckpt" / f"step_{STEPS:04d}" / f"rank_{rank}.pt", weights_only=True)
        assert a["model"].keys() == b["model"].keys()
        for name in a["model"]:
            assert torch.equal(a["model"][name], b["model"][name]), name
        for pid, state in a["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    uninterrupted = {r["step"]: r for r in records(trained_run)}
    for rec in records(resumed):
        assert rec["step"] >= HALF
        for key in ("loss", "val_loss"):
            if key in rec:
                assert rec[key] == uninterrupted[rec["step"]][key], (rec["step"], key)


def _gradient_worker(rank: int, world: int, ep_size: int) -> dict:
    """Synced gradients of a rank's share == single-process gradients of the whole batch."""
    import moe_ep
    from moe_ep.models import ModelConfig, MoETransformerLM
    from moe_ep.parallel.grads import clip_gradients, partition_parameters, sync_gradients

    parallel = moe_ep.init_expert_parallel(ep_size=ep_size)
    base = ModelConfig.preset("tiny")
    moe = base.moe.replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, z_loss_coef=1e-3)
    cfg = base.replace(hidden_size=32, n_layers=3, n_heads=2, dense_intermediate_size=64, max_seq_len=16, moe=moe)
    ids = torch.randint(0, 256, (2 * world, 17), generator=torch.Generator().manual_seed(0))

    def loss_of(model, batch):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) + model.aux_loss()

    reference = MoETransformerLM(cfg, seed=1)
    loss_of(reference, ids).backward()
    model = MoETransformerLM(cfg, parallel, seed=1)
    loss_of(model, ids[2 * rank:2 * rank + 2]).backward()
    sync_gradients(model, parallel)

    _, experts = partition_parameters(model)
    expert_ids = {id(p) for p in experts}
    first, last = parallel.expert_range(cfg.moe.n_routed_experts)
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    errors = {}
    for name, p in model.named_parameters():
        expected = ref_grads[name][first:last] if id(p) in expert_ids else ref_grads[name]
        errors[name] = ((p.grad - expected).abs().max() / (1 + expected.abs().max())).item()
    norm = clip_gradients(model, parallel, None).item()
    ref_norm = clip_gradients(reference, moe_ep.ParallelState(), None).item()
    return dict(errors=errors, norm=norm, ref_norm=ref_norm, n_experts=len(expert_ids))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world,ep_size", [(2, 1), (2, 2), (4, 2)], ids=["dp2", "ep2", "dp2xep2"])
def test_sync_gradients_gives_the_global_gradient(world, ep_size):
    if ep_size > 1:
        pytest.importorskip("moe_ep.dispatch.all_to_all")
    for result in run_on_ranks(_gradient_worker, world, ep_size, timeout=120):
        assert result["n_experts"] == 2 * 2  # two stacks in each of the 2 MoE layers
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] < 1e-5, (worst, result["errors"][worst])
        assert result["norm"] == pytest.approx(result["ref_norm"], rel=1e-5)

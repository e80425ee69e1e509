"""End-to-end training under torchrun (2 gloo processes), crash and resume, and the gradient convention.

One short run (``trained_run``, ep 2) backs the metrics, plots and checkpoint
tests and is the uninterrupted reference of the crash test: the same run
under ``torchrun --max-restarts 1`` has one worker SIGKILLed after its first
checkpoint; the restarted job must resume by itself and end with the same
weights. Every subprocess has a hard timeout and is killed with its whole
process group.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_ep.checkpoint import load_weights, read_manifest
from moe_ep.models import ModelConfig, MoETransformerLM
from moe_ep.parallel.spawn import run_on_ranks
from moe_ep.model_moe import total_aux_loss

REPO = Path(__file__).resolve().parents[1]
STEPS, HALF = 60, 30
RUN_FLAGS = ["--preset", "tiny", "--ep-size", "2", "--steps", str(STEPS), "--batch-size", "8", "--seq-len", "128",
             "--warmup", "10", "--log-every", "10", "--val-every", "30", "--val-batches", "2",
             "--ckpt-every", str(HALF), "--max-data-bytes", str(2 << 20)]
RECORD_FIELDS = {"step", "loss", "aux_loss", "tokens_per_s", "dropped_frac", "max_vio", "grad_norm", "lr",
                 "expert_load", "routed_pairs", "processed_pairs", "dropped_pairs"}


def start_torchrun(args: list[str], log: Path, restarts: int = 0) -> subprocess.Popen:
    """launch/train.py on 2 processes under torchrun (the returned process is the agent), output to ``log``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), str(REPO / "launch" / "train.py"), *args]
    # torch 2.13's agent shares its TCPStore with the workers and keeps it across restarts, so restarted
    # workers can read the dead attempt's gloo addresses and fail to connect (pytorch/pytorch#135712):
    # torch's own switch gives every attempt a fresh store (docs/training.md).
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with log.open("w") as sink:  # a file, not a pipe: nobody reads while the run goes on
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


def worker_pids(agent_pid: int) -> dict[int, int]:
    """{LOCAL_RANK: pid} of the worker processes the torchrun agent ``agent_pid`` started (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        if "LOCAL_RANK" in env:
            found[int(env["LOCAL_RANK"])] = int(entry.name)
    return found


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the torchrun agent's process group and its workers (torchrun starts each in its own session)."""
    workers = worker_pids(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """Wait for ``proc``; return its output, fail on error or timeout (killing the agent and its workers)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        pytest.fail(f"torchrun timed out after {timeout}s (a hang?)\n{log.read_text()[-4000:]}")
    output = log.read_text()
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{output[-4000:]}"
    return output


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    log = out.parent / f"{out.name}.log"
    finish(start_torchrun([*RUN_FLAGS, "--out", str(out)], log), log, timeout=120)
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
        manifest = read_manifest(trained_run / "ckpt" / f"step_{step:04d}")
        assert manifest["step"] == step and manifest["layout"] == dict(world_size=2, ep_size=2, dp_size=1, pp_size=1)
        assert set(manifest["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    folder = out / "ckpt" / f"step_{STEPS:04d}"
    model = MoETransformerLM(ModelConfig.from_dict(read_manifest(folder)["model_config"]), seed=123)
    load_weights(folder, model, model.parallel)
    return model.state_dict()


@pytest.mark.timeout(240)
def test_killed_worker_restarts_and_resumes_by_itself(trained_run, tmp_path):
    """torchrun --max-restarts 1; SIGKILL rank 1 once the step-30 checkpoint is complete; the job resumes itself."""
    out = tmp_path / "crash"
    log = tmp_path / "crash.log"
    proc = start_torchrun([*RUN_FLAGS, "--out", str(out)], log, restarts=1)
    first = out / "ckpt" / f"step_{HALF:04d}" / "manifest.json"
    deadline = time.monotonic() + 150
    try:
        while not first.exists():
            assert proc.poll() is None, f"torchrun exited before its first checkpoint:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 150 s"
            time.sleep(0.05)
        victim = worker_pids(proc.pid)[1]
        os.kill(victim, signal.SIGKILL)
    except BaseException:
        kill(proc)
        raise
    output = finish(proc, log, timeout=150)
    assert "SIGKILL" in output or "Signals.SIGKILL" in output or "exitcode: -9" in output, output[-3000:]
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["resumed_from"] == str(out / "ckpt" / f"step_{HALF:04d}"), "the restarted job did not resume"
    expected, got = final_weights(trained_run), final_weights(out)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), (name, (got[name] - tensor).abs().max())


def _gradient_worker(rank: int, world: int, ep_size: int) -> dict:
    """Synced gradients of a rank's share == single-process gradients of the whole batch."""
    import moe_ep
    from moe_ep.models import ModelConfig, MoETransformerLM
    from moe_ep.gradients import clip_gradients, partition_parameters, sync_gradients

    parallel = moe_ep.init_expert_parallel(ep_size=ep_size)
    base = ModelConfig.preset("tiny")
    moe = base.moe.replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, z_loss_coef=1e-3)
    cfg = base.replace(hidden_size=32, n_layers=3, n_heads=2, dense_intermediate_size=64, max_seq_len=16, moe=moe)
    ids = torch.randint(0, 256, (2 * world, 17), generator=torch.Generator().manual_seed(0))

    def loss_of(model, batch):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) + total_aux_loss(model)

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
    for result in run_on_ranks(_gradient_worker, world, ep_size, timeout=120):
        assert result["n_experts"] == 2 * 2  # two stacks in each of the 2 MoE layers
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] < 1e-5, (worst, result["errors"][worst])
        assert result["norm"] == pytest.approx(result["ref_norm"], rel=1e-5)

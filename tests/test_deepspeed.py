"""DeepSpeed integration (moe_ep/integrations/deepspeed.py, launch/ds_train.py) on CPU, 2 ranks, gloo.

* ZeRO stage 0, 1 and 2 at ep=2 and ep=1: two optimizer steps of the
  ``tiny`` LM through a DeepSpeed engine equal the plain loop
  (``sync_gradients`` + global-norm clipping + torch AdamW) from the same
  seed and batches, parameter by parameter, with clipping active;
  ``save_checkpoint`` / ``load_checkpoint`` into a fresh engine restores the
  weights bitwise and the next step stays equal (optimizer state restored).
* A checkpoint saved at ep=2 loads into an ep=1 model.
* The wrapper: isinstance of DeepSpeed's MoE, expert marks, deepcopy keeps
  them, state dict layout and round trips, optimizer groups, unwrap.
* launch/ds_train.py under the deepspeed launcher writes the same
  metrics.jsonl as launch/train.py under torchrun (both with gradient
  accumulation, activation checkpointing and one MTP module).

Every distributed run has a hard timeout (``run_on_ranks`` / subprocess
timeouts) so a hang fails fast. The first DeepSpeed start on a machine
builds a small shared-memory op (about 50 s) unless launch/setup_venv.sh built it at install; later starts
reuse it.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed (pip install deepspeed): DeepSpeed integration not tested",
                allow_module_level=True)

from moe_ep.parallel.spawn import run_on_ranks  # noqa: E402

from . import deepspeed_workers as workers  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
# fp32 tolerances. Parameters are O(0.1) and move by O(lr = 1e-2) per step. Stage 0 runs the same
# torch AdamW on the same tensors (bitwise equal here); ZeRO's AdamW on flat buffers rounds a few
# parameters differently in the last bits (step 1: a few ulp; 1 ulp of a norm weight ~1.0 is 1.2e-7),
# and the second step amplifies that through Adam's division by sqrt(v) + eps (seen: 1.7e-6).
TOL_STEP1 = 5e-7
TOL = 1e-5


@pytest.fixture(autouse=True)
def _cpu_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # inherited by the spawned ranks before they import deepspeed
    # DeepSpeed JIT-builds its shared-memory op into torch's extension cache. The default cache is shared by
    # every Python environment of the user, each of which rebuilds it (the build command names its own
    # paths) behind one lock file, and a build killed midway leaves the lock behind, stalling every later
    # start. A cache inside this environment is built once and used by this environment alone.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def test_zero_stages_match_plain_loop_and_checkpoints_restore(tmp_path):
    cases = [dict(stage=stage, ep=ep) for ep in (2, 1) for stage in (0, 1, 2)]
    results = run_on_ranks(workers.equivalence_and_checkpoints, 2, cases, str(tmp_path), timeout=240)
    for rank, rank_results in enumerate(results):
        for r in rank_results:
            case = f"rank {rank} ZeRO-{r['stage']} ep={r['ep']}"
            assert r["moved"] > 1e-3, f"{case}: the optimizer did not change the weights"
            step1, step2 = r["param_diffs"]
            assert step1 <= TOL_STEP1, f"{case}: parameters differ from the plain loop by {step1:.2e} after step 1"
            assert step2 <= TOL, f"{case}: parameters differ from the plain loop by {step2:.2e} after step 2"
            for ds, plain in zip(r["ds_norms"], r["plain_norms"]):
                assert ds == pytest.approx(plain, rel=1e-5), f"{case}: grad norm {ds} != plain {plain}"
            assert r["plain_norms"][0] > 0.5, f"{case}: clipping (max 0.5) did not bind"
            assert (r["manual_clip"] is not None) == (r["stage"] == 0)
            assert r["fresh_diff_before_load"] > 1e-3, f"{case}: the fresh model already had the weights"
            assert r["load_diff"] == 0.0, f"{case}: load_checkpoint restored weights off by {r['load_diff']:.2e}"
            assert r["client_state"] == [r["stage"], r["ep"]]
            assert r["resume_step_diff"] <= TOL, (f"{case}: a step after loading differs by "
                                                  f"{r['resume_step_diff']:.2e} (optimizer state not restored?)")
    files = {(r["stage"], r["ep"]): r["files"] for r in results[0]}
    for (stage, ep), names in files.items():
        # one file per (MoE layer, global expert): 3 MoE layers x 16 experts in the tiny preset
        assert sum(n.startswith("layer_") and "_expert_" in n for n in names) == 3 * 16, (stage, ep, names)
        assert "mp_rank_00_model_states.pt" in names
        if stage:
            assert sum(n.startswith("zero_pp_rank_") for n in names) == 2


def test_checkpoint_saved_at_ep2_loads_at_ep1(tmp_path):
    results = run_on_ranks(workers.expert_resharding, 2, str(tmp_path), timeout=180)
    for r in results:
        assert r["expert_diff"] == 0.0 and r["dense_diff"] == 0.0, r


def test_checkpoint_conversion_to_and_from_deepspeed(tmp_path):
    """``python -m moe_ep.checkpoint convert``'s functions: an engine's files -> moe_ep -> DeepSpeed files -> engine."""
    for r in run_on_ranks(workers.checkpoint_conversion, 2, str(tmp_path), timeout=180):
        assert r["keys_equal"] and r["from_engine_diff"] == 0.0, r
        assert r["before_load_diff"] > 1e-3 and r["engine_load_diff"] == 0.0, r


def test_wrapper_marks_deepcopy_and_state_dict_layout():
    results = run_on_ranks(workers.wrapper_properties, 2, timeout=180)
    for r in results:
        assert r["n_wrappers"] == 3 and r["is_moe"] and r["wrapper_type_ok"]
        assert r["group_names"] == ["ep_size_2"]
        assert r["marked"] == ["experts.w_in", "experts.w_out"] and r["marked_group"] == ["ep_size_2"]
        assert r["copy_marks"], "deepcopy dropped allreduce / group_name on expert parameters"
        assert r["copy_is_new"] and r["copy_shares_group"] and r["copy_forward_equal"]
        assert r["assign_load_marks"], "load_state_dict(assign=True) dropped the marks"
        # every key containing "expert" is a routed expert slice (shared experts became moe.shared_mlp.*)
        assert r["expert_keys"] == sorted(f"deepspeed_moe.experts.deepspeed_experts.{i}.{w}"
                                          for i in range(8) for w in ("w_in", "w_out"))
        assert r["slices_equal"] and r["ds_layout_round_trip"] and r["plain_layout_load"]
        assert r["unwrapped_sd_equal"] and r["unwrapped_model_finds_layers"] == 3
        groups = {(name, moe): (wd, n) for name, moe, wd, n in r["optimizer_groups"]}
        assert groups[("ep_size_2", True)][1] > 0 and not any(n == 0 for _, n in groups.values())
        assert {wd for (name, moe), (wd, n) in groups.items()} == {0.1, 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s (a hang?): {' '.join(cmd)}\n{(exc.stdout or '')[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


# one MTP module in every run: MTP under DeepSpeed equals MTP under launch/train.py
COMMON = ["--steps", "4", "--seq-len", "32", "--warmup", "2", "--ep-size", "2", "--log-every", "2", "--val-every", "2",
          "--val-batches", "1", "--max-data-bytes", str(1 << 18), "--activation-checkpointing", "--mtp-depth", "1"]
COMPARED = ("loss", "aux_loss", "grad_norm", "val_loss", "lr", "max_vio", "dropped_frac", "routed_pairs", "processed_pairs",
            "dropped_pairs", "mtp_loss", "mtp_1_loss")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _ds_config(folder: Path, stage: int) -> Path:
    config = json.loads((ROOT / "launch" / "ds_config.json").read_text())
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2)  # 2 sequences per step
    config["zero_optimization"] = {"stage": stage}
    path = folder / f"ds_config_zero{stage}.json"
    path.write_text(json.dumps(config))
    return path


def _ds_train(config: Path, out: Path, *extra: str) -> None:
    _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
          "launch/ds_train.py", "--deepspeed_config", str(config), "--out", str(out), *COMMON, *extra], timeout=200)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """``torchrun launch/train.py`` (ep 2, 2 sequences per rank in 2 micro-batches), checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("plain")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          "launch/train.py", "--batch-size", "2", "--grad-accum", "2", "--ckpt-every", "2", "--out", str(out), *COMMON],
         timeout=120)
    return out


def _assert_records_match(a: dict, b: dict) -> None:
    for key in COMPARED:
        if key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key, a[key], b[key])


def test_ds_train_writes_the_plain_runs_metrics(plain_run, tmp_path):
    """``deepspeed --num_gpus 2 launch/ds_train.py`` (ZeRO-1, ep 2) vs ``torchrun launch/train.py``.

    Both accumulate 2 micro-batches of 1 sequence per step and checkpoint their blocks.
    """
    _ds_train(_ds_config(tmp_path, 1), tmp_path / "ds")
    ds, plain = _records(tmp_path / "ds"), _records(plain_run)
    assert [r["step"] for r in ds] == [r["step"] for r in plain] == [0, 2, 4]
    trained = [r for r in ds if r["step"] > 0]  # step 0 holds the validation before training
    assert trained and all(r.get("mtp_1_loss", 0) > 0 for r in trained), "ds_train's metrics lack the MTP loss"
    for a, b in zip(ds, plain):
        assert set(a) == set(b)
        _assert_records_match(a, b)
        if "expert_load" in a:
            flat_a = [v for row in a["expert_load"] for v in row]
            flat_b = [v for row in b["expert_load"] for v in row]
            assert flat_a == pytest.approx(flat_b, abs=1e-5)
    assert (tmp_path / "ds" / "loss.png").exists() and (tmp_path / "ds" / "run.json").exists()


def test_ds_train_continues_from_a_moe_ep_checkpoint(plain_run, tmp_path):
    """``ds_train.py --init-from`` the plain run's step-2 checkpoint (saved at ep 2), at ep 1 with ZeRO 0.

    Weights, bias, step, data position and the AdamW moments (torch AdamW at
    stage 0) are restored, so steps 3-4 give the plain run's records.
    """
    _ds_train(_ds_config(tmp_path, 0), tmp_path / "ds", "--ep-size", "1",
              "--init-from", str(plain_run / "ckpt" / "step_0002"))
    ds, plain = _records(tmp_path / "ds"), {r["step"]: r for r in _records(plain_run)}
    assert [r["step"] for r in ds] == [2, 4]
    for record in ds:
        _assert_records_match(record, plain[record["step"]])


def test_traffic_counters_follow_deepspeeds_rank_order():
    """DeepSpeed's ``use_data_before_expert_parallel_`` order on 2 emulated nodes x 2 ranks builds EP groups
    {0, 2} and {1, 3}, which span both nodes: every row to the other EP rank is inter-node (the default order's
    groups {0, 1}, {2, 3} would stay inside one node, as every other test here has them)."""
    for r in run_on_ranks(workers.traffic_under_rank_order, 4, True, timeout=180, env=dict(LOCAL_WORLD_SIZE="2")):
        assert len({g // 2 for g in r["ep_group"]}) == 2 and r["nodes"] == 2, r
        assert r["internode_rows_sent"] > 0 and r["intranode_rows_sent"] == 0, r

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

Then, on one process: a checkpoint without its manifest is skipped with a
warning; a truncated or garbled file gives an error naming the file; a
``.metadata`` pickle naming a foreign global is refused unrun. Every
distributed run has a hard timeout (``run_on_ranks``).
"""
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from moe_ep.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, read_manifest
from moe_ep.checkpoint.manifest import write_manifest
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


# ------------------------------------------------------------------ damaged and incomplete checkpoints
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Two single-process checkpoints (steps 1 and 2) of the small model, and a loader for them."""
    from moe_ep.checkpoint import save_checkpoint
    from moe_ep.training.optim import build_optimizer

    out = tmp_path_factory.mktemp("pristine")
    parallel, cfg, sampler, model = workers.setup(1, 1, out)
    optimizer = build_optimizer(model, cfg)
    for step in (1, 2):
        workers.manual_steps(model, optimizer, sampler, parallel, cfg, 1)
        save_checkpoint(out, step, model, optimizer, sampler, parallel, cfg)

    def load(folder):
        return load_checkpoint(folder, model, build_optimizer(model, cfg), sampler, parallel, cfg)

    return out / "ckpt", load, model


@pytest.fixture
def saved(pristine, tmp_path):
    """A private copy of the pristine checkpoints to damage."""
    source, load, _ = pristine
    shutil.copytree(source, tmp_path / "ckpt")
    return tmp_path / "ckpt", load


def rewrite_manifest(folder: Path) -> None:
    """Re-checksum the folder as if the damage had happened before the manifest was written."""
    manifest = read_manifest(folder)
    write_manifest(folder, {k: v for k, v in manifest.items()
                            if k not in ("format", "format_version", "versions", "files")})


def test_incomplete_checkpoint_is_skipped_with_a_warning(saved):
    root, load = saved
    (root / "step_0002" / "manifest.json").unlink()  # as if the save of step 2 was cut short
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint .*step_0002"):
        assert latest_checkpoint(root.parent) == root / "step_0001"
    assert load(root / "step_0001") == 1
    with pytest.raises(CheckpointError, match="step_0002/manifest.json: missing"):
        load(root / "step_0002")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,damage,message", [
    ("__0_0.distcp", _truncate, "truncated"),
    ("__0_0.distcp", _flip_byte, "garbled"),
    (".metadata", _truncate, "truncated"),
    ("manifest.json", _truncate, "not valid JSON"),
], ids=["truncated-data", "garbled-data", "truncated-metadata", "truncated-manifest"])
def test_damaged_file_is_named(saved, name, damage, message):
    root, load = saved
    path = root / "step_0002" / name
    damage(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + message):
        load(root / "step_0002")


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata"])
def test_damage_behind_a_matching_manifest_is_named(saved, name):
    """Damage the checksums cannot see (done before the manifest was written): the reader names the file."""
    root, load = saved
    path = root / "step_0002" / name
    _truncate(path)
    rewrite_manifest(root / "step_0002")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load(root / "step_0002")


def test_metadata_is_never_unpickled_beyond_dcp_classes(saved, tmp_path):
    """A .metadata pickle that names another global (here os.system) is refused before anything runs."""
    root, load = saved
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = root / "step_0002" / ".metadata"
    path.write_bytes(pickle.dumps(Exploit()))
    rewrite_manifest(root / "step_0002")
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*refusing to load global"):
        load(root / "step_0002")
    assert not marker.exists()


def test_convert_to_transformers_layout(pristine, tmp_path):
    """``python -m moe_ep.checkpoint convert --to hf``: each MoE block under transformers' DeepSeek keys."""
    from safetensors.torch import load_file

    from moe_ep import MoELayer
    from moe_ep.checkpoint.__main__ import main
    from moe_ep.interop import to_hf_state_dict

    root, _, model = pristine  # the model holds the weights of step 2
    main(["convert", "--to", "hf", str(root / "step_0002"), str(tmp_path / "moe.safetensors")])
    written = load_file(tmp_path / "moe.safetensors")
    expected = {f"model.layers.{i}.mlp.{key}": tensor for i, block in enumerate(model.layers)
                if isinstance(block.ffn, MoELayer) for key, tensor in to_hf_state_dict(block.ffn).items()}
    assert sorted(written) == sorted(expected)
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in written  # the V3 bias travels too
    assert written["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 2 * 16, 32)  # [E, 2I, H]
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), key

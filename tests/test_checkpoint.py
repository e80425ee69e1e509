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

The same 4 processes record which files each rank hashes (each once: its
own on save, a share on load) and load a damaged copy (every rank raises the
same error). Then, on one process: a checkpoint without its manifest is
skipped with a warning; a truncated or garbled file gives an error naming the
file; a ``.metadata`` pickle naming a foreign global is refused unrun;
hashing needs no Python 3.11; saves and conversions never replace what is not
theirs; DeepSpeed folders' tags and fields are checked. tests/test_checkpoint_fuzz.py
fuzzes damaged checkpoints. Every distributed run has a hard timeout
(``run_on_ranks``).
"""
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from moe_ep.checkpoint import CheckpointError, latest_checkpoint, read_manifest
from moe_ep.training.checkpoints import load_checkpoint
from moe_ep.checkpoint.integrity import checksums
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
    assert result["parses"] == 1, "the DCP metadata is parsed once per load"


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
    assert manifest["layout"] == dict(world_size=4, ep_size=4, dp_size=1, pp_size=1)
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
    from moe_ep.training.checkpoints import save_checkpoint
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
    """Re-checksum the folder's files as if the damage had happened before the manifest was written."""
    manifest = read_manifest(folder)
    write_manifest(folder, {k: v for k, v in manifest.items()
                            if k not in ("format", "format_version", "versions", "files")},
                   checksums(folder, sorted(manifest["files"])))


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
    expected = {f"model.layers.{i}.mlp.{key}": tensor for i, block in model.layers.items()
                if isinstance(block.ffn, MoELayer) for key, tensor in to_hf_state_dict(block.ffn).items()}
    assert sorted(written) == sorted(expected)
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in written  # the V3 bias travels too
    assert written["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 2 * 16, 32)  # [E, 2I, H]
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), key


# ------------------------------------------------------------------ integrity at scale
@pytest.mark.timeout(300)
def test_each_rank_hashes_its_own_files_and_all_raise_the_same_error(source):
    """At world 4: a save hashes each file once, by its writer; a load checks each file once, by the rank whose
    share it is, and parses ``.metadata`` once per rank; damage one rank finds is raised by all, naming the file."""
    root, results = source
    files = sorted(read_manifest(root / "exact" / "ckpt" / "step_0002")["files"])
    assert files == [".metadata"] + [f"__{r}_0.distcp" for r in range(4)]
    assert [r["saved"] for r in results] == [[".metadata", "__0_0.distcp"]] + [[f"__{r}_0.distcp"] for r in (1, 2, 3)]
    assert sorted(name for r in results for name in r["checked"]) == files
    assert all(r["checked"] for r in results) and [r["parses"] for r in results] == [1] * 4
    victim = results[0]["victim"]
    assert [victim in r["checked"] for r in results] == [False, False, False, True]
    assert len({r["error"] for r in results}) == 1
    assert re.search(re.escape(victim) + ": .* bytes, manifest.json records .*truncated", results[0]["error"])


def test_checksums_do_not_need_python_3_11(tmp_path, monkeypatch):
    """``hashlib.file_digest`` is Python 3.11+; the README promises 3.10: files are hashed in chunks."""
    import hashlib

    from moe_ep.checkpoint.manifest import sha256_of

    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    data = torch.randint(0, 256, (5 << 19,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (tmp_path / "f").write_bytes(data.numpy().tobytes())  # 2.5 MiB: several chunks
    assert sha256_of(tmp_path / "f") == hashlib.sha256(data.numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------ what a save or a conversion may replace
def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_conversions_never_replace_what_is_not_their_own(pristine, tmp_path, monkeypatch):
    """A run folder or ``.`` as the target is refused, with or without --overwrite; a checkpoint needs --overwrite."""
    from moe_ep.checkpoint.__main__ import main

    root, _, _ = pristine
    run = tmp_path / "run"
    (run / "ckpt" / "step_0001").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    before = _tree(run)
    ds = tmp_path / "ds"  # not read: the target is checked first
    monkeypatch.chdir(run)
    for target in (run, run / "ckpt", "."):
        for extra in ([], ["--overwrite"]):
            with pytest.raises(SystemExit, match="is not a moe_ep checkpoint"):
                main(["convert", "--to", "moe_ep", str(ds), str(target), *extra])
    assert _tree(run) == before

    existing = tmp_path / "existing"
    shutil.copytree(root / "step_0002", existing)
    kept = _tree(existing)
    with pytest.raises(SystemExit, match=re.escape(str(existing)) + ".*--overwrite"):
        main(["convert", "--to", "moe_ep", str(ds), str(existing)])
    (ds / "t").mkdir(parents=True)
    torch.save(dict(global_steps=1, model_config={}), ds / "t" / "mp_rank_00_model_states.pt")
    with pytest.raises(SystemExit, match="field module"):  # --overwrite let it past the target to the source
        main(["convert", "--to", "moe_ep", str(ds), str(existing), "--tag", "t", "--overwrite"])
    assert _tree(existing) == kept

    (tmp_path / "dst" / "step_0002").mkdir(parents=True)
    (tmp_path / "dst" / "step_0002" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["convert", "--to", "deepspeed", str(root / "step_0002"), str(tmp_path / "dst")])
    assert (tmp_path / "dst" / "step_0002" / "notes.txt").read_text() == "mine"
    hf = tmp_path / "moe.safetensors"
    hf.write_text("old")
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["convert", "--to", "hf", str(root / "step_0002"), str(hf)])
    assert hf.read_text() == "old"
    main(["convert", "--to", "hf", str(root / "step_0002"), str(hf), "--overwrite"])
    assert hf.stat().st_size > 1000


def test_a_save_replaces_only_checkpoint_files(pristine, tmp_path):
    """A save over a folder holding any other file refuses, removing nothing; over checkpoint files it replaces them."""
    from moe_ep import ParallelState
    from moe_ep.checkpoint import write_checkpoint

    root, _, model = pristine
    folder = tmp_path / "step"
    shutil.copytree(root / "step_0002", folder)
    (folder / "notes.txt").write_text("mine")
    before = _tree(folder)
    with pytest.raises(CheckpointError, match="'notes.txt', which is not a file of a moe_ep checkpoint"):
        write_checkpoint(folder, model, ParallelState(), dict(step=7, train_config=None, data=None))
    assert _tree(folder) == before
    (folder / "notes.txt").unlink()
    (folder / "__3_0.distcp").write_bytes(b"left by a save cut short at another world size")
    write_checkpoint(folder, model, ParallelState(), dict(step=7, train_config=None, data=None))
    assert read_manifest(folder)["step"] == 7 and not (folder / "__3_0.distcp").exists()


# ------------------------------------------------------------------ DeepSpeed folders read by the converter
DS_MAIN = dict(module={}, global_steps=1, model_config={})


@pytest.mark.parametrize("latest,changes,message", [
    ("../elsewhere", {}, r"latest: file name '\.\./elsewhere' is not a plain file name"),
    ("/abs/t", {}, r"latest: file name '/abs/t'"),
    ("t", dict(module=None), r"mp_rank_00_model_states.pt: field module is missing"),
    ("t", dict(global_steps=None), r"mp_rank_00_model_states.pt: field global_steps is missing"),
    ("t", dict(data=[1]), r"mp_rank_00_model_states.pt: field data is not a dict"),
    ("t", dict(model_config=dict(vocab_size=256)),
     r"mp_rank_00_model_states.pt: client state: field model_config.dense_intermediate_size is missing"),
], ids=["latest-parent", "latest-absolute", "no-module", "no-global-steps", "data-not-dict", "config-field"])
def test_deepspeed_folder_names_and_fields_are_checked(tmp_path, latest, changes, message):
    """What the converter reads of a DeepSpeed folder: the ``latest`` tag stays inside it, missing fields are named."""
    from moe_ep.training.convert import from_deepspeed

    src = tmp_path / "ds"
    (src / "t").mkdir(parents=True)
    (src / "latest").write_text(latest)
    (tmp_path / "elsewhere").mkdir()  # where the bad tags point: it holds a valid file
    state = {k: v for k, v in {**DS_MAIN, **changes}.items() if v is not None}
    for folder in (src / "t", tmp_path / "elsewhere"):
        torch.save(state, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=message):
        from_deepspeed(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()

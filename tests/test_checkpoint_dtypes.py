"""A student distilled in bf16 is a checkpoint like any other: resumed by launch/train.py, read back as a teacher.

``Distiller(student_dtype="bfloat16").save_student`` (what launch/distill.py
``--student-dtype bfloat16`` calls, through ``distill.checkpoints.save_lm``)
writes bf16 weights and AdamW moments. Loading casts floating-point tensors
to the model's dtype (docs/distillation.md): ``launch/train.py --resume``
continues it with fp32 weights, and ``launch/distill.py --teacher`` builds
the teacher at ``--teacher-dtype``. The launchers run in this process (one
process, the ``tiny`` preset, 16-token sequences).
"""
import importlib
import json
import math
from pathlib import Path

import pytest
import torch

from moe_ep import ParallelState
from moe_ep.checkpoint import load_weights
from moe_ep.training.checkpoints import load_model
from moe_ep.data import BatchSampler, load_corpus
from moe_ep.distill import Distiller
from moe_ep.models import ModelConfig, MoETransformerLM
from moe_ep.training import TrainConfig, evaluate

from . import checkpoint_workers as workers

REPO = Path(__file__).resolve().parents[1]
SEQ, BATCH = 16, 2


def launcher(name: str, monkeypatch):
    """launch/<name>.py as a module; sys.path is restored."""
    monkeypatch.syspath_prepend(str(REPO / "launch"))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A ``tiny`` student after one bf16 distillation step, saved; its validation loss and the launchers' flags."""
    root = tmp_path_factory.mktemp("bf16")
    corpus = root / "text.py"
    corpus.write_bytes(b"".join((REPO / "moe_ep" / name).read_bytes() for name in ("layer.py", "router.py")))
    cfg = TrainConfig(seq_len=SEQ, batch_size=BATCH, warmup_steps=1)
    sampler = BatchSampler(load_corpus(str(corpus)), BATCH, SEQ, cfg.seed)
    d = Distiller(MoETransformerLM(workers.model_config()), MoETransformerLM(ModelConfig.preset("tiny"), seed=0),
                  student_dtype="bfloat16", train_config=cfg)
    batch = sampler.batch(0)
    d.optimize(batch[:, :-1], labels=batch[:, 1:])
    d.save_student(root / "student", sampler)
    val_loss = evaluate(d.student, sampler.val_batches(1), ParallelState())
    flags = ["--seq-len", str(SEQ), "--batch-size", str(BATCH), "--warmup", "1", "--data", str(corpus),
             "--val-batches", "1", "--log-every", "1"]
    return root / "student", val_loss, flags


def test_bf16_student_loads_cast_to_fp32_and_resumes_with_launch_train(student, tmp_path, monkeypatch):
    folder, _, flags = student
    ckpt = folder / "ckpt" / "step_0001"
    as_bf16 = MoETransformerLM(ModelConfig.preset("tiny")).to(torch.bfloat16)
    load_weights(ckpt, as_bf16, ParallelState())  # same dtype: no cast, the saved values themselves
    as_fp32 = load_model(ckpt)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    saved = dict(as_bf16.named_parameters())
    for name, param in as_fp32.named_parameters():
        assert torch.equal(param, saved[name].float()), name

    out = tmp_path / "resumed"
    launcher("train", monkeypatch).main(["--preset", "tiny", "--steps", "2", "--resume", str(ckpt), "--out", str(out),
                                         *flags])
    assert json.loads((out / "run.json").read_text())["resumed_from"] == str(ckpt)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2] and all(math.isfinite(r["loss"]) for r in records
                                                                      if "loss" in r)


def test_bf16_student_is_read_back_as_a_bf16_teacher_by_launch_distill(student, tmp_path, monkeypatch):
    folder, student_val_loss, flags = student
    out = tmp_path / "distilled"
    launcher("distill", monkeypatch).main(["--teacher", str(folder), "--teacher-dtype", "bfloat16", "--student-preset",
                              "tiny-dense", "--steps", "1", "--out", str(out), *flags])
    teacher_val_loss = json.loads((out / "result.json").read_text())["teacher_val_loss"]
    assert teacher_val_loss == student_val_loss  # the same bf16 weights on the same batches

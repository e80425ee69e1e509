"""Distillation: each loss against its formula, the Distiller's contract, transformers models, expert parallelism.

The formulas are computed here independently (plain loops and ``math``) and
compared with ``moe_ep.distill``; the expert-parallel test runs the teacher and
a whole distillation step at ep 2 and compares them with one process.
"""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_ep import ParallelState
from moe_ep.data import BatchSampler, load_corpus
from moe_ep.distill import DistillationLoss, Distiller, kd_loss, logits_mse_loss, map_layers, reverse_kd_loss
from moe_ep.distill.adapters import lm_forward
from moe_ep.models import ModelConfig, MoETransformerLM
from moe_ep.models.transformer import LMOutput
from moe_ep.parallel.spawn import run_on_ranks
from moe_ep.training import PlainTrainer, TrainConfig, evaluate, run, save_checkpoint
from moe_ep.model_moe import moe_layers, parameter_counts, total_aux_loss

REPO = Path(__file__).resolve().parents[1]
SEQ = 16


def small(preset: str = "tiny", **overrides) -> ModelConfig:
    """A preset shrunk for speed (width 32, 3 blocks, 8 experts, 16 tokens)."""
    base = ModelConfig.preset(preset)
    width = overrides.pop("hidden_size", 32)
    moe = base.moe.replace(hidden_size=width, moe_intermediate_size=16, n_routed_experts=8)
    fields = dict(hidden_size=width, n_layers=3, n_heads=2, dense_intermediate_size=64, max_seq_len=SEQ, moe=moe)
    if preset == "tiny-dense":
        fields["first_k_dense"] = overrides.get("n_layers", 3)
    return base.replace(**{**fields, **overrides})


def ids(batch: int = 2, seq: int = SEQ + 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ logit losses against hand computations
def _softmax(row, T):
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


STUDENT = [[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]]
TEACHER = [[[2.0, 0.0, 1.0], [1.5, 1.5, -2.0]]]


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_loss_matches_hand_computation(T):
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    per_token = [_kl(_softmax(tr, T), _softmax(sr, T)) for sr, tr in zip(STUDENT[0], TEACHER[0])]
    assert kd_loss(s, t, T).item() == pytest.approx(T * T * sum(per_token) / 2, rel=1e-5)
    mask = torch.tensor([[True, False]])
    assert kd_loss(s, t, T, mask).item() == pytest.approx(T * T * per_token[0], rel=1e-5)
    reverse = [_kl(_softmax(sr, T), _softmax(tr, T)) for sr, tr in zip(STUDENT[0], TEACHER[0])]
    assert reverse_kd_loss(s, t, T).item() == pytest.approx(T * T * sum(reverse) / 2, rel=1e-5)
    mse = [sum((a - b) ** 2 for a, b in zip(sr, tr)) / 3 for sr, tr in zip(STUDENT[0], TEACHER[0])]
    assert logits_mse_loss(s, t, T, mask).item() == pytest.approx(mse[0], rel=1e-6)


def test_kd_loss_is_zero_for_equal_logits_and_masked_positions_do_not_matter():
    s = torch.randn(2, 5, 11)
    assert kd_loss(s, s.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    garbled = s.clone()
    garbled[1, 3:] = 100.0
    assert kd_loss(garbled, t, 2.0, mask).item() == pytest.approx(kd_loss(s, t, 2.0, mask).item(), rel=1e-6)


def test_map_layers_spreads_evenly_and_ends_together():
    assert map_layers(2, 4) == [(1, 2), (2, 4)]
    assert map_layers(3, 4) == [(1, 2), (2, 3), (3, 4)]
    assert map_layers(4, 2) == [(1, 1), (2, 1), (3, 2), (4, 2)]
    with pytest.raises(ValueError, match="at least one block"):
        map_layers(0, 2)


# ------------------------------------------------------------------ DistillationLoss part by part
def _random_output(n_layers, width, heads, B=2, S=6, V=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    attn = [torch.randn(B, heads, S, S, generator=g).masked_fill(~causal, float("-inf")).softmax(-1)
            for _ in range(n_layers)]
    return LMOutput(logits=torch.randn(B, S, V, generator=g),
                    hidden_states=tuple(torch.randn(B, S, width, generator=g) for _ in range(n_layers + 1)),
                    attentions=tuple(attn))


def test_every_part_of_distillation_loss_matches_its_formula():
    student, teacher = _random_output(2, 4, 2, seed=1), _random_output(4, 6, 3, seed=2)
    labels = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(3))
    labels[0, 0] = -100
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    weights = dict(hidden_loss_weight=0.3, attention_loss_weight=0.7, relation_loss_weight=1.3)
    loss_fn = DistillationLoss(temperature=2.0, alpha=0.25, distill_method="kd", layers=(2, 4), hidden_sizes=(4, 6),
                               **weights)
    aux = torch.tensor(0.05)
    total, parts = loss_fn(student, teacher, labels, mask, student_aux=aux)
    kept = [(b, s) for b in range(2) for s in range(6) if mask[b, s]]
    pairs = [(1, 2), (2, 4)]

    distill = sum(_kl(_softmax(teacher.logits[b, s].tolist(), 2.0), _softmax(student.logits[b, s].tolist(), 2.0))
                  for b, s in kept) * 4.0 / len(kept)
    ce_tokens = [(b, s) for b, s in kept if labels[b, s] != -100]
    ce = sum(-F.log_softmax(student.logits[b, s], -1)[labels[b, s]].item() for b, s in ce_tokens) / len(ce_tokens)
    hidden = sum(sum(((loss_fn.projections[i].weight @ student.hidden_states[j][b, s]
                       - teacher.hidden_states[k][b, s]) ** 2).mean().item() for b, s in kept) / len(kept)
                 for i, (j, k) in enumerate(pairs)) / 2
    attention = sum(sum(_kl(teacher.attentions[k - 1][b, :, s, :s + 1].mean(0).tolist(),
                            student.attentions[j - 1][b, :, s, :s + 1].mean(0).tolist()) for b, s in kept) / len(kept)
                    for j, k in pairs) / 2
    rel_pairs = [(b, i, j) for b in range(2) for i in range(6) for j in range(6) if mask[b, i] and mask[b, j]]
    relation = sum((F.cosine_similarity(student.hidden_states[-1][b, i], student.hidden_states[-1][b, j], dim=0)
                    - F.cosine_similarity(teacher.hidden_states[-1][b, i], teacher.hidden_states[-1][b, j], dim=0))
                   .item() ** 2 for b, i, j in rel_pairs) / len(rel_pairs)

    expected = dict(distill=distill, ce=ce, hidden=hidden, attention=attention, relation=relation, aux=0.05)
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-4), name
    combined = 0.25 * distill + 0.75 * ce + 0.3 * hidden + 0.7 * attention + 1.3 * relation + 0.05
    assert total.item() == pytest.approx(combined, rel=1e-4)
    assert parts["total"].item() == pytest.approx(combined, rel=1e-4)


def test_distillation_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="distill_method"):
        DistillationLoss(distill_method="cosine")
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match="layers"):
        DistillationLoss(hidden_loss_weight=1.0)
    out = _random_output(2, 4, 2)
    with pytest.raises(ValueError, match="labels"):
        DistillationLoss(alpha=0.5)(out, out)
    with pytest.raises(ValueError, match="attentions"):
        DistillationLoss(alpha=1.0, attention_loss_weight=1.0, layers=(2, 2))(out, LMOutput(out.logits))
    with pytest.raises(ValueError, match="logits"):
        kd_loss(out.logits, out.logits[..., :5], 1.0)


# ------------------------------------------------------------------ our model's attention probabilities
def test_attention_probabilities_and_hidden_states_of_our_model():
    model = MoETransformerLM(small()).eval()
    x = ids()[:, :-1]
    with torch.no_grad():
        plain = model(x)
        out = model(x, output_hidden_states=True, output_attentions=True)
    assert (out.logits - plain).abs().max() < 1e-5  # explicit softmax == SDPA
    assert len(out.hidden_states) == 4 and len(out.attentions) == 3
    probs = out.attentions[0]
    assert probs.shape == (2, 2, SEQ, SEQ)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, SEQ))
    assert probs.triu(1).abs().max() == 0
    assert torch.allclose(F.linear(out.hidden_states[-1], model.embed.weight), out.logits, atol=1e-6)  # after norm


# ------------------------------------------------------------------ the Distiller
def _distiller(teacher_cfg, student_cfg, **kwargs):
    defaults = dict(hidden_loss_weight=0.5, attention_loss_weight=0.5, relation_loss_weight=0.5,
                    train_config=TrainConfig(steps=10, warmup_steps=1, lr=1e-2, seq_len=SEQ))
    return Distiller(MoETransformerLM(teacher_cfg, seed=1), MoETransformerLM(student_cfg, seed=2),
                     **{**defaults, **kwargs})


def test_gradients_reach_only_the_student_and_the_teacher_stays_unchanged():
    d = _distiller(small(), small("tiny-dense", hidden_size=16, n_heads=1, n_layers=2))
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in d.student.state_dict().items()}
    batch = ids()
    total, parts = d.compute_loss(batch[:, :-1], labels=batch[:, 1:])
    assert set(parts) == {"distill", "ce", "hidden", "attention", "relation", "aux", "total"}
    total.backward()
    assert not d.teacher.training and all(not p.requires_grad and p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    assert len(d.loss.projections) == 2 and all(p.grad is not None for p in d.loss.projections.parameters())
    for step in range(3):
        d.optimize(batch[:, :-1], labels=batch[:, 1:])
    assert all(torch.equal(v, teacher_before[k]) for k, v in d.teacher.state_dict().items())
    assert all(not torch.equal(v, student_before[k]) for k, v in d.student.state_dict().items()
               if k.endswith("weight"))
    assert d.step == 3


def _stepping_distiller(grad_accum: int, precision: str = "fp32") -> Distiller:
    """A distiller of a batch of 4 in ``grad_accum`` micro-batches at ``precision``, AdamW eps 1e-3 (at 1e-8 an
    element with a rounding-level gradient moves by up to lr either way)."""
    cfg = TrainConfig(steps=10, warmup_steps=1, lr=1e-2, seq_len=SEQ, batch_size=4, grad_accum=grad_accum,
                      precision=precision)
    d = _distiller(small(), small("tiny-dense"), hidden_loss_weight=0.5, attention_loss_weight=0.0,
                   relation_loss_weight=0.0, train_config=cfg)
    for optimizer in (opt for opt in (d.optimizer, d.projection_optimizer) if opt is not None):
        for group in optimizer.param_groups:
            group["eps"] = 1e-3
    return d


def _weights(d: Distiller) -> dict:
    return {k: v.clone() for k, v in d.student.state_dict().items()}


def test_gradient_accumulation_is_the_whole_batch_in_micro_batches():
    """2 micro-batches of 2 sequences take the step 1 batch of 4 takes (token means over equal halves)."""
    whole, halves = _stepping_distiller(1), _stepping_distiller(2)
    one, two = whole.train_step(ids(batch=4), step=0), halves.train_step(ids(batch=4), step=0)
    a, b = _weights(whole), _weights(halves)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert torch.allclose(one.ce, two.ce, rtol=1e-6) and set(one.parts) == set(two.parts) >= {"distill", "hidden"}
    assert len(two.stats) == 2 and len(one.stats) == 1  # one entry of MoE statistics per micro-batch


def test_bf16_distillation_runs_the_student_under_autocast():
    fp32, bf16 = _stepping_distiller(1), _stepping_distiller(1, precision="bf16")
    logits_dtypes = []
    bf16.student.register_forward_hook(lambda module, args, out: logits_dtypes.append(out.logits.dtype))
    ref, result = fp32.train_step(ids(batch=4), step=0), bf16.train_step(ids(batch=4), step=0)
    assert logits_dtypes == [torch.bfloat16]
    assert all(torch.isfinite(v) for v in (result.ce, result.aux, *result.parts.values()))
    assert result.ce.item() == pytest.approx(ref.ce.item(), rel=2e-2)
    assert all(v.dtype == torch.float32 for v in _weights(bf16).values())  # weights and buffers stay fp32


def test_masked_positions_do_not_change_the_loss_and_left_padding_is_refused():
    d = _distiller(small(), small("tiny-dense"), hidden_loss_weight=0.0, attention_loss_weight=0.0,
                   relation_loss_weight=0.0)
    batch = ids()
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 10:] = 0
    changed = batch.clone()
    changed[1, 11:] = (changed[1, 11:] + 5) % 256  # inputs from position 11, labels from 10: all masked
    with torch.no_grad():
        _, a = d.compute_loss(batch[:, :-1], mask, batch[:, 1:])
        _, b = d.compute_loss(changed[:, :-1], mask, changed[:, 1:])
    for name in ("distill", "ce"):
        assert a[name].item() == pytest.approx(b[name].item(), rel=1e-5), name
    with pytest.raises(ValueError, match="right-padded"):
        d.compute_loss(batch[:, :-1], mask.flip(-1), batch[:, 1:])


def test_distiller_rejects_a_dropping_teacher_and_other_vocabularies():
    cfg = small()
    dropping = cfg.replace(moe=cfg.moe.replace(expert_capacity_factor=1.0, eval_capacity_factor=1.0))
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        Distiller(MoETransformerLM(dropping), MoETransformerLM(small("tiny-dense")))
    with pytest.raises(ValueError, match="vocabulary"):
        Distiller(MoETransformerLM(cfg), MoETransformerLM(small("tiny-dense", vocab_size=300)))
    with pytest.raises(ValueError, match="dtype"):
        Distiller(MoETransformerLM(cfg), MoETransformerLM(cfg), teacher_dtype="float8")
    with pytest.raises(ValueError, match="ep_size"):
        Distiller(MoETransformerLM(cfg, ParallelState(ep_size=2)), MoETransformerLM(cfg))


def test_teacher_and_student_dtypes():
    d = _distiller(small(), small("tiny-dense", hidden_size=16, n_heads=1), teacher_dtype="bfloat16",
                   student_dtype=torch.bfloat16)
    assert {p.dtype for p in d.teacher.parameters()} == {p.dtype for p in d.student.parameters()} == {torch.bfloat16}
    assert d.teacher.layers["0"].attn.rope.cos_SD.dtype == torch.float32  # buffers keep their precision
    batch = ids()
    parts = d.optimize(batch[:, :-1], labels=batch[:, 1:]).parts
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in parts.values())


def test_dense_preset_trains_checkpoints_and_loads_as_a_teacher(tmp_path, corpus_file):
    """A model without MoE layers through the training loop, a checkpoint, and back as a teacher."""
    cfg = small("tiny-dense")
    model = MoETransformerLM(cfg, seed=3)
    assert moe_layers(model) == [] and total_aux_loss(model).item() == 0.0
    assert parameter_counts(model).total == parameter_counts(model).activated
    train_cfg = TrainConfig(steps=2, batch_size=2, seq_len=SEQ, warmup_steps=1, log_every=1, val_every=1,
                            val_batches=1, ckpt_every=2, out_dir=str(tmp_path))
    sampler = BatchSampler(load_corpus(str(corpus_file)), 2, SEQ, 0)
    result = run(PlainTrainer(model, ParallelState(), train_cfg), sampler, ParallelState(), train_cfg)
    assert result.last_checkpoint is not None and sorted(result.val_losses) == [0, 1, 2]
    d = Distiller(tmp_path, MoETransformerLM(small()))
    assert all(torch.equal(a, b) for a, b in zip(d.teacher.state_dict().values(), model.state_dict().values()))


# ------------------------------------------------------------------ transformers teacher and student
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_transformers_teacher_and_student(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    batch = ids()
    d = Distiller(str(llama_dir), MoETransformerLM(small()), hidden_loss_weight=0.5, attention_loss_weight=0.5,
                  relation_loss_weight=0.5)
    assert d.teacher.hf.config._attn_implementation == "eager"
    with torch.no_grad():
        out = lm_forward(d.teacher, batch[:, :-1], output_hidden_states=True, output_attentions=True)
        reference = AutoModelForCausalLM.from_pretrained(llama_dir)(batch[:, :-1]).logits
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert (out.logits - reference).abs().max() < 1e-5
    parts = d.optimize(batch[:, :-1], labels=batch[:, 1:]).parts
    assert all(torch.isfinite(v) for v in parts.values())

    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    byte_tokens = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(256)}, unk_token="<0>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_tokens, unk_token="<0>")
    d = Distiller(MoETransformerLM(small()), str(llama_dir), tokenizer=tokenizer,
                  train_config=TrainConfig(warmup_steps=1))
    d.optimize(batch[:, :-1], labels=batch[:, 1:])
    d.save_student(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    with torch.no_grad():
        assert torch.equal(reloaded(batch[:, :-1]).logits, d.student(batch[:, :-1]))
    assert len(AutoTokenizer.from_pretrained(tmp_path / "student")) == 256


# ------------------------------------------------------------------ expert parallelism
@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.py"
    path.write_bytes(b"".join((REPO / "moe_ep" / name).read_bytes() for name in ("layer.py", "router.py")))
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, corpus_file) -> Path:
    """A single-process checkpoint of a small MoE teacher (read at ep 2 by the tests below)."""
    out = tmp_path_factory.mktemp("teacher")
    model = MoETransformerLM(small(), seed=1)
    cfg = TrainConfig(seq_len=SEQ, batch_size=2, out_dir=str(out))
    sampler = BatchSampler(load_corpus(str(corpus_file)), 2, SEQ, 0)
    save_checkpoint(out, 1, model, torch.optim.AdamW(model.parameters()), sampler, ParallelState(), cfg)
    return out


def _ep_worker(rank: int, world: int, teacher_dir: str) -> dict:
    """Teacher logits and one whole distillation step at ep = world against one process."""
    import moe_ep
    from moe_ep.gradients import sync_gradients

    parallel = moe_ep.init_expert_parallel(ep_size=world)
    batch = ids(2 * world, seed=5)
    mine = batch[2 * rank:2 * rank + 2]
    settings = dict(hidden_loss_weight=0.5, attention_loss_weight=0.5, relation_loss_weight=0.5,
                    train_config=TrainConfig(warmup_steps=1))
    student_cfg = small(hidden_size=16, n_heads=1, n_layers=2)
    ref = Distiller(teacher_dir, MoETransformerLM(student_cfg, seed=2), **settings)
    ep = Distiller(teacher_dir, MoETransformerLM(student_cfg, parallel, seed=2), parallel=parallel, **settings)
    assert len(moe_layers(ep.teacher)[0].experts.w_in) == 8 // world
    with torch.no_grad():
        ref_logits = ref.teacher(batch[:, :-1])[2 * rank:2 * rank + 2]
        ep_logits = ep.teacher(mine[:, :-1])
    dropped = sum(layer.last_stats.dropped_pairs.item() for layer in moe_layers(ep.teacher))

    ref_total, ref_parts = ref.compute_loss(batch[:, :-1], labels=batch[:, 1:])
    ref_total.backward()
    ep_total, ep_parts = ep.compute_loss(mine[:, :-1], labels=mine[:, 1:])
    ep_total.backward()
    sync_gradients(ep.trainable, parallel)
    part_means = torch.stack([ep_parts[k] for k in sorted(ep_parts)])
    parallel.all_reduce_world(part_means)
    first, last = parallel.expert_range(8)
    ref_grads = dict(ref.trainable.named_parameters())
    grad_errors = {}
    for name, p in ep.trainable.named_parameters():
        expected = ref_grads[name].grad
        expected = expected[first:last] if ".experts." in name else expected
        grad_errors[name] = ((p.grad - expected).abs().max() / (1 + expected.abs().max())).item()
    return dict(logit_error=(ep_logits - ref_logits).abs().max().item(), dropped=dropped,
                parts={k: (v.item(), ref_parts[k].item()) for k, v in zip(sorted(ep_parts), part_means / world)},
                grad_errors=grad_errors)


@pytest.mark.timeout(120)
def test_expert_parallel_teacher_and_step_equal_single_process(teacher_dir):
    for result in run_on_ranks(_ep_worker, 2, str(teacher_dir), timeout=100):
        assert result["logit_error"] < 1e-5
        assert result["dropped"] == 0
        for name, (ep_value, ref_value) in result["parts"].items():
            assert ep_value == pytest.approx(ref_value, rel=1e-5, abs=1e-7), name
        worst = max(result["grad_errors"], key=result["grad_errors"].get)
        assert result["grad_errors"][worst] < 1e-5, (worst, result["grad_errors"][worst])


# ------------------------------------------------------------------ launch/distill.py under torchrun
@pytest.mark.timeout(120)
def test_launcher_writes_metrics_plots_and_a_loadable_student(teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "distill.py"), "--teacher", str(teacher_dir), "--student-preset", "tiny",
           "--ep-size", "2", "--steps", "4", "--batch-size", "2", "--seq-len", str(SEQ), "--warmup", "1",
           "--log-every", "2", "--val-every", "2", "--val-batches", "1", "--ckpt-every", "4", "--relation-weight",
           "1", "--data", str(corpus_file), "--out", str(out), "--grad-accum", "2", "--tensorboard"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"launch/distill.py timed out (a hang?)\n{proc.communicate()[0][-3000:]}")
    assert proc.returncode == 0, output[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert set(records[0]) == {"step", "val_loss", "teacher_val_loss"}
    for record in records[1:]:
        assert {"loss", "aux_loss", "expert_load", "distill_loss", "relation_loss", "total_loss"} <= set(record)
        assert "hidden_loss" not in record
    for name in ("loss.png", "expert_load.png", "loss_parts.png"):
        assert (out / name).stat().st_size > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "--tensorboard wrote no event file"
    result = json.loads((out / "result.json").read_text())
    assert result["parameters"]["student"]["total"] > result["parameters"]["student"]["activated"]
    student = Distiller(str(out), MoETransformerLM(small())).teacher  # the saved student, read back at ep 1
    assert student.config == ModelConfig.preset("tiny")
    val = BatchSampler(load_corpus(str(corpus_file)), 4, SEQ, 0).val_batches(1)  # both ranks' validation windows
    assert evaluate(student, val, ParallelState()) == pytest.approx(result["student_val_loss"], rel=1e-5)

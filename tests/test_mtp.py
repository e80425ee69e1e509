"""Multi-token prediction (moe_ep/models/mtp.py, moe_ep/training/mtp.py): the loss against a hand computation,
D = 0 as before the modules existed, checkpoints with and without them, the metrics and plots, the flags."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_ep.checkpoint import CheckpointError
from moe_ep.models import ModelConfig, MoETransformerLM
from moe_ep.training.checkpoints import model_config_from
from moe_ep.training.step import language_model_loss

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


def launcher(monkeypatch, name: str):
    """launch/<name>.py as a module (outside torchrun)."""
    monkeypatch.syspath_prepend(str(REPO / "launch"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    spec = importlib.util.spec_from_file_location(f"mtp_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_config(**changes) -> ModelConfig:
    """2 blocks (dense, then MoE with 4 experts top-2), width 32, untied embeddings."""
    base = ModelConfig.preset("tiny")
    moe = base.moe.replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2)
    return base.replace(hidden_size=32, n_layers=2, n_heads=2, dense_intermediate_size=48, max_seq_len=16,
                        tie_embeddings=False, moe=moe, **changes)


def ids(batch: int = 3, length: int = 13) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def test_loss_equals_a_hand_computation():
    """lambda / D * sum_k CE_k, each CE_k written out: t_{i+k} embedded, h^{k-1}_i, t_{i+k+1} predicted."""
    config, weight = small_config(mtp_depth=2), 0.3
    model = MoETransformerLM(config, seed=0).train()
    batch = ids()
    loss, parts = language_model_loss(model, model, weight)(batch)
    loss = loss.detach()
    with torch.no_grad():
        h = model.run_blocks(batch[:, :-1])[0]
        S, eps, head = h.shape[1], config.norm_eps, model.lm_head.weight
        ce_main = -F.log_softmax(rms(h, model.norm.weight, eps) @ head.T, -1).gather(
            -1, batch[:, 1:, None]).mean()
        ces = []
        for k, module in enumerate(model.mtp.values(), start=1):
            rows = []
            for i in range(S - k):  # position by position
                emb = model.embed.weight[batch[:, i + k]]
                rows.append(torch.cat([rms(emb, module.enorm.weight, eps), rms(h[:, i], module.hnorm.weight, eps)],
                                      -1) @ module.eh_proj.weight.T)
            h = module.block(torch.stack(rows, 1))[0]
            log_p = F.log_softmax(rms(h, module.head_norm.weight, eps) @ head.T, -1)
            ces.append(-log_p.gather(-1, batch[:, k + 1:, None]).mean())
        aux = sum(layer.aux_loss for layer in [model.layers["1"].ffn, *(m.block.ffn for m in model.mtp.values())])
    want_mtp = weight / 2 * (ces[0] + ces[1])
    for got, want in ((parts["ce"], ce_main), (parts["mtp_1"], ces[0]), (parts["mtp_2"], ces[1]),
                      (parts["mtp"], want_mtp), (parts["aux"], aux), (loss, ce_main + want_mtp + aux)):
        assert math.isclose(got.item(), want.item(), rel_tol=1e-5), (got.item(), want.item())


def test_depth_zero_is_the_model_without_modules():
    """D = 0 builds, initialises and trains what the model did before MTP existed; MTP changes no other weight
    and not the model's function; a checkpoint config without mtp_depth reads as 0."""
    plain, with_mtp = MoETransformerLM(small_config(), seed=0), MoETransformerLM(small_config(mtp_depth=1), seed=0)
    assert plain.mtp is None and not any(".mtp." in n or n.startswith("mtp.") for n in plain.state_dict())
    extra = {n for n in with_mtp.state_dict()} - set(plain.state_dict())
    assert extra and all(n.startswith("mtp.2.") for n in extra)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, with_mtp.state_dict()[name]), name
    batch = ids()
    assert torch.equal(plain(batch[:, :-1]), with_mtp(batch[:, :-1]))
    loss, parts = language_model_loss(plain, plain)(batch)
    assert set(parts) == {"ce", "aux"}
    ce = F.cross_entropy(plain(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    assert torch.equal(loss.detach(), (ce + plain.layers["1"].ffn.aux_loss).detach())
    old = small_config().to_dict()
    del old["mtp_depth"]
    assert model_config_from(old, "manifest.json").mtp_depth == 0
    with pytest.raises(ValueError, match="mtp_depth"):
        small_config(mtp_depth=-1)
    with pytest.raises(CheckpointError, match="mtp_depth"):
        model_config_from({**old, "mtp_depth": "two"}, "manifest.json")
    with pytest.raises(ValueError, match="no MTP modules"):
        plain(batch[:, :-1], mtp_labels=batch[:, 1:])


def test_dense_model_has_dense_mtp_blocks_and_short_sequences_are_refused():
    dense = MoETransformerLM(small_config(first_k_dense=2, mtp_depth=1), seed=0)
    assert type(dense.mtp["2"].block.ffn).__name__ == "DenseFFN"
    moe = MoETransformerLM(small_config(mtp_depth=3), seed=0)
    with pytest.raises(ValueError, match="mtp_depth 3 needs sequences of more than 3"):
        language_model_loss(moe, moe)(ids(length=4))


def _trainer(depth: int, out: Path, steps: int):
    from moe_ep import ParallelState
    from moe_ep.data import BatchSampler, load_corpus
    from moe_ep.training import PlainTrainer, TrainConfig

    cfg = TrainConfig(steps=steps, batch_size=2, seq_len=12, warmup_steps=1, log_every=1, val_every=steps,
                      val_batches=1, ckpt_every=1, out_dir=str(out))
    model = MoETransformerLM(small_config(mtp_depth=depth), seed=0)
    sampler = BatchSampler(load_corpus(None, max_bytes=1 << 15), cfg.batch_size, cfg.seq_len, 0, 0, 1)
    return PlainTrainer(model, ParallelState(), cfg, mtp_weight=0.3), sampler, cfg


def test_metrics_and_checkpoints_carry_the_modules(tmp_path):
    """The driver writes mtp_loss and each depth's loss to metrics.jsonl and the loss plot; a checkpoint holds the
    modules; a checkpoint written before the field existed (no mtp_depth) resumes at D = 0."""
    from moe_ep.checkpoint import read_manifest
    from moe_ep.training import run
    from moe_ep.training.checkpoints import load_checkpoint, load_model

    trainer, sampler, cfg = _trainer(2, tmp_path / "mtp", 2)
    run(trainer, sampler, trainer.parallel, cfg)
    records = [json.loads(line) for line in (tmp_path / "mtp" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert {"mtp_loss", "mtp_1_loss", "mtp_2_loss"} <= set(last)
    assert math.isclose(last["mtp_loss"], 0.3 / 2 * (last["mtp_1_loss"] + last["mtp_2_loss"]), rel_tol=1e-6)
    assert (tmp_path / "mtp" / "loss.png").is_file()
    step2 = tmp_path / "mtp" / "ckpt" / "step_0002"
    assert read_manifest(step2)["model_config"]["mtp_depth"] == 2
    loaded = load_model(step2)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    trainer, sampler, cfg = _trainer(0, tmp_path / "plain", 1)
    folder = trainer.save(tmp_path / "plain", 1, sampler)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["model_config"]["mtp_depth"]  # as written before the field existed
    (folder / "manifest.json").write_text(json.dumps(manifest))
    fresh, sampler, cfg = _trainer(0, tmp_path / "plain", 1)
    assert load_checkpoint(folder, fresh.model, fresh.optimizer, sampler, fresh.parallel, cfg) == 1


def test_flags(capsys, monkeypatch):
    """--mtp-depth and --mtp-weight reach the model and the trainer; what cannot work is refused, naming the flag."""
    from moe_ep.training.model_source import preset_config

    train, ds_train = launcher(monkeypatch, "train"), launcher(monkeypatch, "ds_train")
    args = train.parse_args(["--mtp-depth", "2", "--mtp-weight", "0.1"])
    assert preset_config(args.preset, args.moe, args.mtp_depth).mtp_depth == 2 and args.mtp_weight == 0.1

    for argv, needle in ((["--hf-model", "x", "--mtp-depth", "1"], "argument --mtp-depth"),
                         (["--mtp-depth", "-1"], "argument --mtp-depth"),
                         (["--mtp-depth", "1", "--mtp-weight", "-0.5"], "argument --mtp-weight"),
                         (["--upcycle-from", "x", "--mtp-depth", "1"], "argument --mtp-depth")):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert needle in capsys.readouterr().err, argv
    ds_args = ds_train.parse_args(["--deepspeed_config", str(REPO / "launch" / "ds_config.json"), "--mtp-depth", "1",
                                   "--mtp-weight", "0.1"])
    assert (ds_args.mtp_depth, ds_args.mtp_weight) == (1, 0.1)
    with pytest.raises(SystemExit):
        ds_train.parse_args(["--deepspeed_config", str(REPO / "launch" / "ds_config.json"), "--mtp-depth", "1",
                             "--hf-model", "x"])
    assert "argument --mtp-depth" in capsys.readouterr().err


def test_activation_checkpointing_gives_the_same_gradients():
    """The MTP blocks are checkpointed with the model's blocks; the gradients do not change."""
    grads = []
    for checkpointed in (False, True):
        model = MoETransformerLM(small_config(mtp_depth=2), seed=0).train()
        model.activation_checkpointing = checkpointed
        language_model_loss(model, model)(ids())[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and any(n.startswith("mtp.") for n in grads[0])
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-5, atol=1e-7), name

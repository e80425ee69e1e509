"""Upcycling a dense model into an MoE (moe_ep/models/upcycle.py): the dense function at step 0, at ep 1 and 2, through
the launcher, and the configurations it refuses."""
import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

import moe_ep
from moe_ep import MoELayer, ParallelState
from moe_ep.checkpoint import write_checkpoint
from moe_ep.data import BatchSampler, load_corpus
from moe_ep.models import ModelConfig, MoETransformerLM
from moe_ep.models.upcycle import UpcycleError, upcycle, upcycled_config
from moe_ep.parallel.spawn import run_on_ranks
from moe_ep.training.driver import evaluate

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
# (segments, MoEConfig overrides): coarse; coarse with V3 routing; fine m = 4 with 1 shared expert (R = 3);
# fine m = 6 with 2 shared experts (R = 4), node-limited groups of two copies
CASES = {"coarse": (None, {}),
         "coarse_v3": (None, dict(scoring_func="sigmoid", topk_method="node_limited", n_group=4, topk_group=2,
                                  num_experts_per_tok=3, aux_free_bias=True)),
         "fine4": (4, dict(n_routed_experts=6, num_experts_per_tok=3)),
         "fine6_limited": (6, dict(n_shared_experts=2, n_routed_experts=16, num_experts_per_tok=4,
                                   topk_method="node_limited", n_group=2, topk_group=1))}


def dense_config() -> ModelConfig:
    """A narrow ``tiny-dense``: 3 dense blocks, FFN width 96."""
    base = ModelConfig.preset("tiny-dense")
    moe = base.moe.replace(hidden_size=32, n_routed_experts=8)
    return base.replace(hidden_size=32, n_layers=3, first_k_dense=3, n_heads=2, dense_intermediate_size=96,
                        max_seq_len=16, moe=moe)


def _ids(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 17), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("case", sorted(CASES))
def test_upcycled_model_computes_the_dense_function(case):
    segments, overrides = CASES[case]
    dense = MoETransformerLM(dense_config(), seed=3)
    config = upcycled_config(dense.config, segments, None, overrides)
    model = upcycle(dense, config, seed=1)
    assert [name for name, m in model.named_modules() if isinstance(m, MoELayer)] == ["layers.1.ffn", "layers.2.ffn"]
    dense_state = dense.state_dict()
    for name, tensor in model.state_dict().items():
        if ".ffn." not in name or name.startswith("layers.0."):
            assert torch.equal(tensor, dense_state[name]), name
    batch = _ids()
    with torch.no_grad():
        assert (model.eval()(batch[:, :-1]) - dense.eval()(batch[:, :-1])).abs().max() < 1e-5
    assert abs(evaluate(model, [batch], ParallelState()) - evaluate(dense, [batch], ParallelState())) < 1e-5


def _ep_worker(rank: int, world: int) -> dict:
    """Coarse and the richest fine case upcycled at ep 2, against the dense model and the one-process upcycled
    model, on every rank."""
    state = moe_ep.init_expert_parallel(ep_size=2)
    batches = [_ids(8)]
    dense = MoETransformerLM(dense_config(), seed=3)
    dense_loss = evaluate(dense, batches, ParallelState())
    shard = slice(4 * rank, 4 * rank + 4)
    out = {}
    for case in ("coarse", "fine6_limited"):
        segments, overrides = CASES[case]
        config = upcycled_config(dense.config, segments, None, overrides)
        one = upcycle(dense, config, seed=1).state_dict()
        model = upcycle(dense, config, state, seed=1)
        first, last = state.expert_range(config.moe.n_routed_experts)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, one[name][first:last] if ".experts." in name else one[name]), (case, name)
        out[case] = abs(evaluate(model, [b[shard] for b in batches], state) - dense_loss)
    return out


def test_upcycled_first_loss_equals_the_dense_loss_at_ep2():
    for errors in run_on_ranks(_ep_worker, 2, timeout=150):
        assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("dense_blocks,segments,first_k_dense,overrides,source,match", [
    (3, None, None, dict(norm_topk_prob=False), "moe", "norm_topk_prob=False: upcycling coarse needs True"),
    (3, None, None, dict(n_shared_experts=1), "moe", "n_shared_experts=1: upcycling coarse needs 0"),
    (3, None, None, dict(expert_capacity_factor=1.0), "moe", "expert_capacity_factor=1.0"),
    (3, 4, None, dict(routed_scaling_factor=1.0), "moe", r"routed_scaling_factor=1.0: upcycling fine \(m = 4\) needs"),
    (3, 4, None, dict(n_routed_experts=8), "moe", "n_routed_experts = 8: .* multiple of 3"),
    (3, 4, None, dict(n_routed_experts=6, num_experts_per_tok=2), "moe", "num_experts_per_tok = 2"),
    (3, 4, None, dict(n_shared_experts=4), "moe", "n_shared_experts=4: .* fewer shared experts"),
    (3, 5, None, {}, "segments", "96 neurons do not split into m = 5"),
    (3, None, 3, {}, "first_k_dense", r"first_k_dense=3: must lie in \[0, n_layers = 3\)"),
    (1, None, None, {}, "dense", "has MoE layers .* it must be dense"),
])
def test_upcycled_config_refuses_what_breaks_the_dense_function(dense_blocks, segments, first_k_dense, overrides,
                                                                source, match):
    with pytest.raises(UpcycleError, match=match) as caught:
        upcycled_config(dense_config().replace(first_k_dense=dense_blocks), segments, first_k_dense, overrides)
    assert caught.value.source == source


def _launcher(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "launch"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    spec = importlib.util.spec_from_file_location("upcycle_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_upcycles_a_dense_checkpoint(tmp_path, monkeypatch):
    """launch/train.py --upcycle-from: the run's first validation loss is the dense model's; flags checked first."""
    train = _launcher(monkeypatch)
    dense = MoETransformerLM(dense_config(), seed=3)
    folder = write_checkpoint(tmp_path / "dense" / "ckpt" / "step_0000", dense, ParallelState(),
                              dict(step=0, train_config=None, data=None))
    common = ["--upcycle-from", str(tmp_path / "dense"), "--steps", "1", "--batch-size", "2", "--val-batches", "2",
              "--max-data-bytes", str(1 << 16), "--out", str(tmp_path / "up")]
    train.main(common + ["--upcycle", "fine", "4", "--moe", "n_routed_experts=6", "--moe", "num_experts_per_tok=3"])
    first = json.loads((tmp_path / "up" / "metrics.jsonl").read_text().splitlines()[0])
    val = BatchSampler(load_corpus(None, max_bytes=1 << 16), 2, 16, 0, 0, 1).val_batches(2)
    assert abs(first["val_loss"] - evaluate(dense, val, ParallelState())) < 1e-5
    assert json.loads((tmp_path / "up" / "run.json").read_text())["upcycled_from"] == str(tmp_path / "dense")
    for argv, flag in ((["--upcycle", "fine", "4"], "--moe"), (["--moe", "routed_scaling_factor=2.0"], "--moe"),
                       (["--upcycle", "fine", "0"], "--upcycle"), (["--first-k-dense", "3"], "--first-k-dense")):
        stderr = io.StringIO()
        with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(stderr):
            train.parse_args(common[:-2] + ["--out", str(tmp_path / "x")] + argv)
        assert exit_.value.code == 2 and f"argument {flag}:" in stderr.getvalue(), stderr.getvalue()
    stderr = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(stderr):
        train.parse_args(["--upcycle-from", str(folder / "nothing")])
    assert "argument --upcycle-from: " in stderr.getvalue()

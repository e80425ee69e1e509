"""Multi-token prediction under expert and pipeline parallelism (gloo, 2 processes): 2 training steps of a model
of 4 blocks with 2 MTP modules (MoE blocks, untied embeddings) equal the one-process run's within 1e-5 (per step: the
cross-entropy, the MTP loss and each depth's, the aux loss and the global grad norm; then the validation loss).

* ep 2 (each rank its half of the global batch) against one process with the whole batch;
* pp 2 x ep 1 under 1f1b (the last stage on its own rank, with its own copy of the embedding for the MTP
  modules, gradients summed with the first stage's), 2 micro-batches, and under zbv and dualpipev (4 stages, the
  last one on rank 0 beside the first; their split backward, except the MTP stage's), 4 micro-batches, each
  against one process with as many micro-batches.
"""
import math

import pytest

from moe_ep.parallel.spawn import run_on_ranks

pytestmark = pytest.mark.timeout(240)

GLOBAL_BATCH, SEQ, STEPS = 4, 12, 2
KEYS = ("ce", "aux", "grad_norm", "mtp", "mtp_1", "mtp_2")
SCHEDULES = {"1f1b": 2, "zbv": 4, "dualpipev": 4}  # schedule: micro-batches per step


def _config():
    from ..test_mtp import small_config

    return small_config(mtp_depth=2).replace(n_layers=4)  # a block for each of the V schedules' 4 stages


def _train_config(data_ranks: int, grad_accum: int):
    from moe_ep.training import TrainConfig

    return TrainConfig(steps=STEPS, batch_size=GLOBAL_BATCH // data_ranks, seq_len=SEQ, grad_accum=grad_accum,
                       lr=1e-2, warmup_steps=1, val_batches=1)


def _steps(trainer, cfg, parallel) -> list[dict]:
    from moe_ep.data import load_corpus
    from moe_ep.training.runs import sampler_for

    sampler = sampler_for(load_corpus(max_bytes=1 << 15), cfg, parallel)
    out = []
    for step in range(STEPS):
        result = trainer.train_step(sampler.batch(step), step)
        out.append(dict(ce=float(result.ce), aux=float(result.aux), grad_norm=float(result.grad_norm),
                        **{k: float(v) for k, v in result.parts.items()}))
    out.append(dict(val=trainer.evaluate(sampler.val_batches(1), parallel)))
    return out


def _plain(parallel, data_ranks: int, grad_accum: int) -> list[dict]:
    from moe_ep.models import MoETransformerLM
    from moe_ep.training import PlainTrainer

    cfg = _train_config(data_ranks, grad_accum)
    return _steps(PlainTrainer(MoETransformerLM(_config(), parallel, seed=0), parallel, cfg, mtp_weight=0.3), cfg,
                  parallel)


def _ep2(rank: int, world: int) -> list[dict]:
    import moe_ep

    return _plain(moe_ep.init_expert_parallel(ep_size=2), 2, 1)


def _pp2(rank: int, world: int) -> dict:
    import torch

    import moe_ep
    from moe_ep.training.pipeline import PipelineTrainer

    parallel = moe_ep.init_expert_parallel(ep_size=1, pp_size=2)
    out = {}
    for schedule, micro in SCHEDULES.items():
        cfg = _train_config(1, micro)
        out[schedule] = _steps(PipelineTrainer(_config(), parallel, cfg, torch.device("cpu"), 0, schedule,
                                               mtp_weight=0.3), cfg, parallel)
    return out


def _assert_same(got: list[dict], want: list[dict], what: str) -> None:
    for step, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), (what, step)
        for key in g:
            assert math.isclose(g[key], w[key], rel_tol=1e-5, abs_tol=1e-7), (what, step, key, g[key], w[key])


def test_mtp_at_ep2_and_pp2_equals_one_process():
    from moe_ep import ParallelState

    ep_ranks = run_on_ranks(_ep2, 2, timeout=200)
    one = _plain(ParallelState(), 1, 1)
    assert set(one[0]) == set(KEYS)
    mean = [{k: (a[k] + b[k]) / 2 if k in ("ce", "mtp", "mtp_1", "mtp_2") else a[k] for k in a}
            for a, b in zip(*ep_ranks)]  # each rank's own losses, over the same number of tokens
    _assert_same(mean, one, "ep 2")

    one = {micro: _plain(ParallelState(), 1, micro) for micro in set(SCHEDULES.values())}
    for pp_rank, result in enumerate(run_on_ranks(_pp2, 2, timeout=200)):
        assert set(result) == set(SCHEDULES)
        for schedule, steps in result.items():
            _assert_same(steps, one[SCHEDULES[schedule]], f"pp 2 {schedule} (pp rank {pp_rank})")

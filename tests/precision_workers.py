"""Rank functions of tests/test_precision.py: bf16, gradient accumulation, activation checkpointing (plain loop).

Every function runs the plain loop's step (``moe_ep.training.step.train_step``)
on the ``tiny`` LM, shrunk to short sequences, and returns plain Python values.
The single-process cases call them with ``ParallelState()``; the spawned ranks
(``run_on_ranks``) with ``init_expert_parallel``.
"""
from __future__ import annotations

import torch

from .deepspeed_workers import _max_diff, _sampler
from moe_ep.model_moe import moe_layers

SEQ_LEN = 32


def model_config(**moe_overrides):
    """``tiny`` with the V3 bias on (so its update is compared too) and ``moe_overrides``."""
    from moe_ep.models import ModelConfig

    base = ModelConfig.preset("tiny").replace(max_seq_len=SEQ_LEN)
    return base.replace(moe=base.moe.replace(aux_free_bias=True, bias_update_rate=1e-2, **moe_overrides))


# Sequence-scope balance loss (tiny's alpha_1 = 0.01) and a z-loss (divided by the global token count), no dropping:
# the case where the micro-batches' summed gradients equal the whole batch's.
ACCUM_MOE = dict(z_loss_coef=1e-3)
# Dropping with protected sequences and router noise: what a recomputation must replay exactly.
DROPPING_MOE = dict(expert_capacity_factor=1.0, protected_seq_frac=0.25, router_jitter=0.05, check_finite=True)


def train_config(**overrides):
    from moe_ep.training import TrainConfig

    values = dict(steps=8, batch_size=8, seq_len=SEQ_LEN, lr=1e-2, warmup_steps=0, grad_clip=0.5)
    values.update(overrides)
    return TrainConfig(**values)


def batches(cfg, rank: int, world: int, n: int) -> list[torch.Tensor]:
    """This rank's batches of the first ``n`` steps (byte corpus, as the launchers draw them)."""
    sampler = _sampler(cfg, rank, world)
    return [sampler.batch(step) for step in range(n)]


def _bias(model) -> torch.Tensor:
    return torch.cat([layer.router.e_score_correction_bias for layer in moe_layers(model)])


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run_steps(parallel, train_cfg, model_cfg, steps: int, rank: int = 0, world: int = 1,
              checkpointing: bool = False, record_keeps: bool = False, adam_eps: float = 1e-8) -> dict:
    """``steps`` plain-loop steps from seed 0; the per-step results and the final state (gradients of the last step).

    ``record_keeps``: every dispatch's keep mask, per MoE layer, in call order.
    ``adam_eps``: AdamW's eps (the loop's is 1e-8).
    """
    from moe_ep.activation_checkpointing import enable_activation_checkpointing
    from moe_ep.models import MoETransformerLM
    from moe_ep.training import PlainTrainer

    torch.manual_seed(100 + rank)  # router noise
    model = MoETransformerLM(model_cfg, parallel, seed=0)
    if checkpointing:
        enable_activation_checkpointing(model)
    keeps = [[] for _ in moe_layers(model)]
    if record_keeps:
        for layer, calls in zip(moe_layers(model), keeps):
            layer.dispatcher = _KeepRecorder(layer.dispatcher, calls)
    trainer = PlainTrainer(model, parallel, train_cfg)
    for group in trainer.optimizer.param_groups:
        group["eps"] = adam_eps
    out = dict(ce=[], aux=[], grad_norm=[], stats=[], after_backward=[])
    for step, batch in enumerate(batches(train_cfg, rank, world, steps)):
        result = trainer.train_step(batch, step)
        out["ce"].append(float(result.ce))
        out["aux"].append(float(result.aux))
        out["grad_norm"].append(float(result.grad_norm))
        out["stats"].append([[s.as_dict() for s in micro] for micro in result.stats])
        # after backward (a recomputation ran there): still the forward's
        out["after_backward"].append([(layer.last_stats.as_dict(), float(layer.aux_loss.detach()))
                                      for layer in moe_layers(model)])
    layers = moe_layers(model)
    out.update(params=_params(model), grads={name: p.grad.clone() for name, p in model.named_parameters()},
               bias=_bias(model).clone(), keeps=keeps,
               drop_step=[int(layer.drop_step) for layer in layers],
               forward_count=[layer.forward_count for layer in layers],
               pending=[(float(layer.load_accum.abs().sum()), layer.pending_drop_forwards) for layer in layers])
    return out


class _KeepRecorder:
    """A dispatcher that records each call's keep mask, then returns the wrapped dispatcher's result."""

    def __init__(self, dispatcher, calls: list):
        self.dispatcher, self.calls = dispatcher, calls

    def __call__(self, *args, **kwargs):
        result = self.dispatcher(*args, **kwargs)
        self.calls.append(result.keep_TK.clone())
        return result


# AdamW's first update is lr * g / (|g| + eps): with the loop's eps = 1e-8, an element whose gradient is at
# rounding level (|g| ~ 1e-9, which summing two micro-batches instead of one batch changes) moves by up to lr
# either way (seen: 1.3e-3). eps = 1e-3 keeps the update Lipschitz in g, so the parameters compare at fp32 level.
ACCUM_ADAM_EPS = 1e-3


def accumulation_matches_one_batch(parallel, rank: int = 0, world: int = 1) -> dict:
    """One step: 2 micro-batches of 4 sequences vs 1 of 8 (same data); gradient, parameter and bias differences."""
    from moe_ep.models import MoETransformerLM

    model_cfg = model_config(**ACCUM_MOE)
    one = run_steps(parallel, train_config(grad_accum=1), model_cfg, 1, rank, world, adam_eps=ACCUM_ADAM_EPS)
    two = run_steps(parallel, train_config(grad_accum=2), model_cfg, 1, rank, world, adam_eps=ACCUM_ADAM_EPS)
    pairs = [sum(s["routed_pairs"] for micro in r["stats"][0] for s in micro) for r in (one, two)]
    loads = [[sum(torch.tensor(micro[i]["tokens_per_expert"]) for micro in r["stats"][0]).tolist()
              for i in range(len(r["stats"][0][0]))] for r in (one, two)]
    return dict(param_diff=_max_diff(one["params"], two["params"]), grad_diff=_max_diff(one["grads"], two["grads"]),
                moved=_max_diff(one["params"], _params(MoETransformerLM(model_cfg, parallel, seed=0))),
                ce=(one["ce"][0], two["ce"][0]),
                aux=(one["aux"][0], two["aux"][0]), grad_norm=(one["grad_norm"][0], two["grad_norm"][0]),
                bias_equal=torch.equal(one["bias"], two["bias"]), bias_moved=float(one["bias"].abs().max()),
                micro_batches=(len(one["stats"][0]), len(two["stats"][0])), pairs=pairs,
                loads_equal=loads[0] == loads[1])


def checkpointing_matches_plain(parallel, rank: int = 0, world: int = 1) -> dict:
    """Two steps with dropping, with and without activation checkpointing; what must be equal, and the keeps."""
    model_cfg = model_config(**DROPPING_MOE)
    cfg = train_config(batch_size=4)
    plain = run_steps(parallel, cfg, model_cfg, 2, rank, world, record_keeps=True)
    ckpt = run_steps(parallel, cfg, model_cfg, 2, rank, world, checkpointing=True, record_keeps=True)
    same = {key: plain[key] == ckpt[key] for key in ("ce", "aux", "grad_norm", "stats", "after_backward", "drop_step",
                                                      "forward_count", "pending")}
    # plain: one dispatch per layer and step; checkpointed: the forward's, then the recomputation's
    replayed = all(len(c) == 2 * len(p) and all(torch.equal(c[2 * i], c[2 * i + 1]) and torch.equal(c[2 * i], k)
                                                for i, k in enumerate(p))
                   for p, c in zip(plain["keeps"], ckpt["keeps"]))
    dropped = sum(s["dropped_pairs"] for micro in plain["stats"][0] for s in micro)
    return dict(same=same, param_diff=_max_diff(plain["params"], ckpt["params"]),
                bias_equal=torch.equal(plain["bias"], ckpt["bias"]), replayed=replayed, dropped=dropped,
                drop_step=ckpt["drop_step"], forward_count=ckpt["forward_count"])


def bf16_tracks_fp32(parallel, rank: int = 0, world: int = 1, steps: int = 8) -> dict:
    """A short bf16 (autocast) run and the fp32 run from the same start: losses, bias bytes, dtypes."""
    model_cfg = model_config()
    fp32 = run_steps(parallel, train_config(), model_cfg, steps, rank, world)
    bf16 = run_steps(parallel, train_config(precision="bf16"), model_cfg, steps, rank, world)
    def row_bytes(run: dict) -> list:
        """Bytes per dispatched row, per MoE layer, of the last step (expert parallelism only)."""
        return [s["bytes_sent"] / max(s["rows_sent"], 1) for s in run["stats"][-1][0] if "bytes_sent" in s]

    return dict(fp32_ce=fp32["ce"], bf16_ce=bf16["ce"], bias_bytes=bf16["bias"].numpy().tobytes().hex(),
                row_bytes=(row_bytes(fp32), row_bytes(bf16)),
                bias_dtype=str(bf16["bias"].dtype), bias_moved=float(bf16["bias"].abs().max()),
                param_dtypes=sorted({str(p.dtype) for p in bf16["params"].values()}))


def parallel_checks(rank: int, world: int) -> dict:
    """The ep 2 (and, for accumulation, ep 1 = dp 2) cases on the spawned ranks."""
    import moe_ep

    out = dict(accum={})
    for ep in (1, 2):
        out["accum"][ep] = accumulation_matches_one_batch(moe_ep.init_expert_parallel(ep_size=ep), rank, world)
    parallel = moe_ep.init_expert_parallel(ep_size=2)
    out["checkpointing"] = checkpointing_matches_plain(parallel, rank, world)
    out["bf16"] = bf16_tracks_fp32(parallel, rank, world)
    return out

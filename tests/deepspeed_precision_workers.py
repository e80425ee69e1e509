"""Rank functions of tests/test_deepspeed_precision.py: bf16, fp16 overflow and gradient accumulation under DeepSpeed.

DeepSpeed is imported inside the functions (the spawned ranks have
``DS_ACCELERATOR=cpu``). Weights are compared through DeepSpeed's fp32
master copies (``_masters``) against the plain loop's fp32 parameters.
Results are plain Python values.
"""
from __future__ import annotations

import torch

from . import deepspeed_workers as ds_workers
from . import precision_workers as plain_workers
from moe_ep.model_moe import moe_layers


def _engine(model, cfg, stage: int, **config_overrides):
    """A DeepSpeed engine around ``model`` (wrapped here) with ``ds_workers.ds_config`` plus ``config_overrides``."""
    import deepspeed
    from moe_ep.integrations.deepspeed import wrap_moe_layers
    from moe_ep.training.deepspeed import grad_clip_plan, optimizer_param_groups, undo_initial_optimizer_step

    wrap_moe_layers(model, model.parallel.ep_size)
    config, manual_clip = grad_clip_plan({**ds_workers.ds_config(cfg, stage), **config_overrides})
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=optimizer_param_groups(model, cfg.weight_decay))
    undo_initial_optimizer_step(engine)  # as launch/ds_train.py
    return engine, manual_clip


def _adamw(cfg, eps: float) -> dict:
    """The DeepSpeed optimizer section of ``cfg`` with AdamW's ``eps``."""
    return {"type": "AdamW", "params": dict(lr=cfg.lr, betas=[cfg.beta1, cfg.beta2], eps=eps,
                                            weight_decay=cfg.weight_decay, torch_adam=True)}


def _masters(engine, model) -> dict[str, torch.Tensor]:
    """fp32 weights by plain name: ZeRO's hp partitions, stage 0's fp16 optimizer groups, else the parameter."""
    from deepspeed.utils import safe_get_full_fp32_param

    optimizer = engine.optimizer
    stage0 = {id(low): high for lows, highs in zip(getattr(optimizer, "fp16_groups", []),
                                                  getattr(optimizer, "fp32_groups", []))
              for low, high in zip(lows, highs)}
    out = {}
    for name, p in model.named_parameters():
        master = safe_get_full_fp32_param(p)
        if master is None:
            master = stage0.get(id(p), p)
        out[name.replace(ds_workers.PLAIN_NAME, ".")] = master.detach().float().clone()
    return out


def _steps(engine, model, parallel, sampler, cfg, manual_clip, steps: range) -> list:
    from moe_ep.training.deepspeed import deepspeed_step as train_step
    from moe_ep.training.optim import lr_at

    return [train_step(engine, model, sampler.batch(step), lr_at(step, cfg), parallel, manual_clip) for step in steps]


def _update_error(masters: dict, plain: dict, initial: dict) -> tuple[float, float]:
    """(max |DeepSpeed - plain|, ||DeepSpeed - plain|| / ||plain - initial||) over the weights (``masters``' keys)."""
    diff = torch.cat([(masters[n] - plain[n]).flatten() for n in masters])
    update = torch.cat([(plain[n] - initial[n]).flatten() for n in masters])
    return float(diff.abs().max()), float(diff.norm() / update.norm())


# As in precision_workers.ACCUM_ADAM_EPS: bf16 gradients differ from the plain loop's at bf16 level, and Adam's
# first updates lr * g / (|g| + 1e-8) turn that into +-lr on every element whose gradient is near rounding level.
BF16_ADAM_EPS = 1e-3


def _plain_run(parallel, sampler, cfg, n_steps: int, adam_eps: float) -> tuple[dict, list]:
    """The plain loop's ``n_steps`` from seed 0: (final weights and bias by plain name, step results)."""
    from moe_ep.models import MoETransformerLM
    from moe_ep.training import PlainTrainer

    model = MoETransformerLM(ds_workers.model_config(), parallel, seed=0)
    trainer = PlainTrainer(model, parallel, cfg)
    for group in trainer.optimizer.param_groups:
        group["eps"] = adam_eps
    results = [trainer.train_step(sampler.batch(step), step) for step in range(n_steps)]
    return ds_workers._state(model), results


def bf16_stages_match_plain_loop(rank: int, world: int, stages: tuple = (0, 1, 2), n_steps: int = 2) -> dict:
    """ZeRO ``stages`` in bf16 at ep 2 vs the plain loop in bf16 (autocast), from the same weights and batches.

    ``rel``: ||DeepSpeed - plain|| / ||plain update|| over the weights; the
    plain loop's own bf16-vs-fp32 value (``plain_rel``) is the scale of bf16 rounding.
    """
    import moe_ep
    from moe_ep.integrations.deepspeed import deepspeed_parallel_state
    from moe_ep.models import MoETransformerLM

    cfg = ds_workers.train_config(precision="bf16")
    sampler = ds_workers._sampler(cfg, rank, world)
    parallel = moe_ep.init_expert_parallel(ep_size=2)
    initial = ds_workers._state(MoETransformerLM(ds_workers.model_config(), parallel, seed=0))
    plain, plain_results = _plain_run(parallel, sampler, cfg, n_steps, BF16_ADAM_EPS)
    fp32, _ = _plain_run(parallel, sampler, ds_workers.train_config(), n_steps, BF16_ADAM_EPS)
    weights = [n for n in initial if "e_score_correction_bias" not in n]
    out = dict(plain_ce=[float(r.ce) for r in plain_results], plain_norms=[float(r.grad_norm) for r in plain_results],
               plain_rel=_update_error({n: plain[n] for n in weights}, fp32, initial)[1])
    ds_parallel = deepspeed_parallel_state(2)
    for stage in stages:
        model = MoETransformerLM(ds_workers.model_config(), ds_parallel, seed=0)
        engine, manual_clip = _engine(model, cfg, stage, bf16={"enabled": True}, optimizer=_adamw(cfg, BF16_ADAM_EPS))
        results = _steps(engine, model, ds_parallel, sampler, cfg, manual_clip, range(n_steps))
        bias = plain_workers._bias(model)
        max_abs, rel = _update_error(_masters(engine, model), plain, initial)
        out[stage] = dict(ce=[float(r.ce) for r in results], norms=[float(r.grad_norm) for r in results],
                          applied=[r.applied for r in results], max_abs=max_abs, rel=rel,
                          bias_bytes=bias.numpy().tobytes().hex(), bias_dtype=str(bias.dtype),
                          param_dtype=str(next(model.parameters()).dtype))
    return out


def accumulation_matches_one_batch(rank: int, world: int, cases: tuple = ((1, 0), (2, 2))) -> dict:
    """Per (ep, ZeRO stage): one step of micro 4 x 2 accumulation steps vs micro 8 x 1 (fp32, same data)."""
    from moe_ep.integrations.deepspeed import deepspeed_parallel_state
    from moe_ep.models import MoETransformerLM

    cfg = plain_workers.train_config()  # 8 sequences per rank per step
    model_cfg = plain_workers.model_config(**plain_workers.ACCUM_MOE)
    sampler = ds_workers._sampler(cfg, rank, world)
    out = {}
    for ep, stage in cases:
        parallel = deepspeed_parallel_state(ep)
        runs = []
        for micro, accum in ((8, 1), (4, 2)):
            model = MoETransformerLM(model_cfg, parallel, seed=0)
            engine, manual_clip = _engine(model, cfg, stage, train_micro_batch_size_per_gpu=micro,
                                          gradient_accumulation_steps=accum,
                                          optimizer=_adamw(cfg, plain_workers.ACCUM_ADAM_EPS))
            initial = _masters(engine, model)
            (result,) = _steps(engine, model, parallel, sampler, cfg, manual_clip, range(1))
            runs.append(dict(result=result, masters=_masters(engine, model), initial=initial,
                             bias=plain_workers._bias(model),
                             pending=[float(layer.load_accum.abs().sum()) for layer in moe_layers(model)]))
        one, two = runs
        out[ep] = dict(stage=stage, micro_batches=(len(one["result"].stats), len(two["result"].stats)),
                       param_diff=ds_workers._max_diff(one["masters"], two["masters"]),
                       moved=ds_workers._max_diff(one["masters"], one["initial"]),
                       ce=(float(one["result"].ce), float(two["result"].ce)),
                       norms=(float(one["result"].grad_norm), float(two["result"].grad_norm)),
                       bias_equal=torch.equal(one["bias"], two["bias"]), bias_moved=float(one["bias"].abs().max()),
                       pending=two["pending"])
    return out


def fp16_overflow_changes_nothing(rank: int, world: int, stage: int = 2) -> dict:
    """ep 2, fp16 (dynamic loss scale), dropping on: step 0 applied, step 1 forced to overflow, step 2 applied.

    The overflow: rank 0's gradient of one expert stack becomes inf (rank 1
    sees finite gradients, so the ranks must agree to skip).
    """
    from moe_ep.integrations.deepspeed import deepspeed_parallel_state
    from moe_ep.models import MoETransformerLM
    from moe_ep.training.metrics import IntervalMeter

    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fast fp16 kernels (not on these CPUs); torch's
    # fp16 arithmetic works everywhere, so the check is lifted to run DeepSpeed's real fp16 optimizer and loss scaler.
    get_accelerator().is_fp16_supported = lambda: True
    cfg = ds_workers.train_config(batch_size=4)
    sampler = ds_workers._sampler(cfg, rank, world)
    parallel = deepspeed_parallel_state(2)
    model = MoETransformerLM(plain_workers.model_config(**plain_workers.DROPPING_MOE), parallel, seed=0)
    engine, manual_clip = _engine(model, cfg, stage, fp16={"enabled": True, "loss_scale": 0,
                                                           "initial_scale_power": 8})
    layers = moe_layers(model)

    def snapshot() -> dict:
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        return dict(masters=_masters(engine, model), params=params, bias=plain_workers._bias(model),
                    drop_step=[int(layer.drop_step) for layer in layers])

    meter = IntervalMeter(len(layers), model.config.moe.n_routed_experts, 1, torch.device("cpu"))
    results = _steps(engine, model, parallel, sampler, cfg, manual_clip, range(1))
    before = snapshot()
    poisoned = layers[0].experts.w_in
    hook = poisoned.register_hook(lambda g: torch.full_like(g, float("inf"))) if rank == 0 else None
    results += _steps(engine, model, parallel, sampler, cfg, manual_clip, range(1, 2))
    if hook is not None:
        hook.remove()
    after_skip = snapshot()
    pending = [(float(layer.load_accum.abs().sum()), layer.pending_drop_forwards) for layer in layers]
    results += _steps(engine, model, parallel, sampler, cfg, manual_clip, range(2, 3))
    after_next = snapshot()
    for result in results:
        meter.add(result)
    record = meter.flush(parallel)
    return dict(applied=[r.applied for r in results], dropped=sum(int(s.dropped_pairs) for s in results[1].stats[0]),
                masters_diff=ds_workers._max_diff(before["masters"], after_skip["masters"]),
                params_equal=all(torch.equal(before["params"][n], after_skip["params"][n]) for n in before["params"]),
                bias_equal=torch.equal(before["bias"], after_skip["bias"]),
                drop_step=(before["drop_step"], after_skip["drop_step"], after_next["drop_step"]), pending=pending,
                next_moved=ds_workers._max_diff(after_skip["masters"], after_next["masters"]),
                next_bias_moved=float((after_next["bias"] - after_skip["bias"]).abs().max()),
                skipped_steps=record["skipped_steps"], grad_norm=record["grad_norm"],
                param_dtype=str(poisoned.dtype))


def all_checks(rank: int, world: int) -> dict:
    """Every check of this file on one pair of ranks (one DeepSpeed start)."""
    return dict(bf16=bf16_stages_match_plain_loop(rank, world), accum=accumulation_matches_one_batch(rank, world),
                fp16=fp16_overflow_changes_nothing(rank, world))

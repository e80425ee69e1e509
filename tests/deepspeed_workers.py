"""Rank functions of tests/test_deepspeed.py (run by ``moe_ep.parallel.spawn.run_on_ranks``).

DeepSpeed is imported inside the functions, in the spawned processes, whose
environment has ``DS_ACCELERATOR=cpu`` (the test sets it before spawning).
Results are plain Python values.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from moe_ep.model_moe import moe_layers

PLAIN_NAME = ".moe."  # the level a wrapper adds to parameter names


def model_config(aux_free_bias: bool = True):
    """The ``tiny`` LM preset (with the V3 bias on, so buffers and their update are covered too)."""
    from moe_ep.models import ModelConfig

    base = ModelConfig.preset("tiny")
    return base.replace(moe=base.moe.replace(aux_free_bias=aux_free_bias, bias_update_rate=1e-2))


def train_config(**overrides):
    from moe_ep.training import TrainConfig

    # Large lr and a clip that binds (the global norm is ~5): a wrong norm or scale shows up.
    values = dict(steps=3, batch_size=2, seq_len=32, lr=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=0.5)
    values.update(overrides)
    return TrainConfig(**values)


def ds_config(cfg, stage: int) -> dict:
    """The DeepSpeed config equal to ``cfg`` (as launch/ds_config.json with ZeRO ``stage``)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2], "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "gradient_clipping": cfg.grad_clip or 0.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10 ** 9,
    }


def _sampler(cfg, rank: int, world: int):
    from moe_ep.data import BatchSampler, load_corpus

    return BatchSampler(load_corpus(max_bytes=1 << 18), cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)


def _plain_steps(model, parallel, sampler, cfg, steps: range, snapshots: list | None = None) -> list[float]:
    """The plain trainer's step (``moe_ep.training.PlainTrainer``) on ``steps``; returns the grad norms.

    ``snapshots`` (optional) receives ``_state(model)`` after each step.
    """
    from moe_ep.training import PlainTrainer

    trainer = PlainTrainer(model, parallel, cfg)
    norms = []
    for step in steps:
        norms.append(float(trainer.train_step(sampler.batch(step), step).grad_norm))
        if snapshots is not None:
            snapshots.append(_state(model))
    return norms


def _engine(parallel, cfg, stage: int, seed: int, ep_size: int):
    import deepspeed
    from moe_ep.integrations.deepspeed import wrap_moe_layers
    from moe_ep.training.deepspeed import grad_clip_plan, optimizer_param_groups
    from moe_ep.models import MoETransformerLM

    model = MoETransformerLM(model_config(), parallel, seed=seed)
    wrap_moe_layers(model, ep_size)
    config, manual_clip = grad_clip_plan(ds_config(cfg, stage))
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=optimizer_param_groups(model, cfg.weight_decay))
    return engine, model, manual_clip


def _ds_steps(engine, model, parallel, sampler, cfg, manual_clip, steps: range,
              snapshots: list | None = None) -> list[float]:
    """``deepspeed_step`` (what launch/ds_train.py runs) on ``steps``; returns the grad norms."""
    from moe_ep.training.deepspeed import deepspeed_step
    from moe_ep.training.optim import lr_at

    norms = []
    for step in steps:
        norms.append(float(deepspeed_step(engine, model, sampler.batch(step), lr_at(step, cfg), parallel,
                                      manual_clip).grad_norm))
        if snapshots is not None:
            snapshots.append(_state(model))
    return norms


def _state(model) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by their plain (unwrapped) names."""
    out = {name.replace(PLAIN_NAME, "."): t.detach().clone() for name, t in model.named_parameters()}
    out.update({name.replace(PLAIN_NAME, "."): t.detach().clone() for name, t in model.named_buffers()
                if name.endswith("e_score_correction_bias")})
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"names differ: {sorted(set(a) ^ set(b))[:6]}"
    for name in a:
        assert a[name].shape == b[name].shape, f"{name}: {tuple(a[name].shape)} != {tuple(b[name].shape)}"
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _changed(before: dict, after: dict) -> float:
    return max(float((before[n] - after[n]).abs().max()) for n in before)


def equivalence_and_checkpoints(rank: int, world: int, cases: list[dict], ckpt_root: str) -> list[dict]:
    """For each (stage, ep): DeepSpeed training == the plain loop; save / load into a fresh engine.

    Per case: two optimizer steps of the ``tiny`` LM through the engine and
    through the plain loop (``sync_gradients`` + clipping + torch AdamW) from
    the same seed and batches; compare every parameter (and the V3 bias) and
    the grad norms. Then ``engine.save_checkpoint``, a fresh model (other
    seed) and engine, ``load_checkpoint``: weights must be equal bitwise, and
    one more step on both engines must stay equal (optimizer state restored).
    """
    import moe_ep
    from moe_ep.integrations.deepspeed import deepspeed_parallel_state
    from moe_ep.models import MoETransformerLM

    results = []
    for case in cases:
        stage, ep = case["stage"], case["ep"]
        cfg = train_config()
        sampler = _sampler(cfg, rank, world)
        ds_parallel = deepspeed_parallel_state(ep)
        plain_parallel = moe_ep.init_expert_parallel(ep_size=ep)
        plain = MoETransformerLM(model_config(), plain_parallel, seed=0)
        initial = _state(plain)
        plain_states: list = []
        plain_norms = _plain_steps(plain, plain_parallel, sampler, cfg, range(2), plain_states)

        engine, model, manual_clip = _engine(ds_parallel, cfg, stage, seed=0, ep_size=ep)
        assert engine.has_moe_layers and len(engine.num_experts) == model.config.n_moe_layers
        layer = next(m for m in model.modules() if hasattr(m, "adopt_parallel_state")).moe
        assert layer.parallel.ep_group is ds_parallel.ep_group, "the layer does not run on DeepSpeed's EP group"
        assert _max_diff(initial, _state(model)) == 0.0, "the two models do not start from the same weights"
        ds_states: list = []
        ds_norms = _ds_steps(engine, model, ds_parallel, sampler, cfg, manual_clip, range(2), ds_states)
        trained = _state(model)
        result = dict(stage=stage, ep=ep, param_diffs=[_max_diff(a, b) for a, b in zip(ds_states, plain_states)],
                      moved=_changed(initial, trained), plain_norms=plain_norms, ds_norms=ds_norms,
                      manual_clip=manual_clip)

        folder = Path(ckpt_root) / f"stage{stage}_ep{ep}"
        engine.save_checkpoint(str(folder), tag="t2", client_state=dict(marker=[stage, ep]))
        fresh_engine, fresh, _ = _engine(ds_parallel, cfg, stage, seed=123, ep_size=ep)
        result["fresh_diff_before_load"] = _max_diff(trained, _state(fresh))
        path, client = fresh_engine.load_checkpoint(str(folder), tag="t2")
        assert path is not None, f"load_checkpoint found nothing in {folder}"
        result["client_state"] = client.get("marker")
        result["load_diff"] = _max_diff(trained, _state(fresh))
        _ds_steps(engine, model, ds_parallel, sampler, cfg, manual_clip, range(2, 3))
        _ds_steps(fresh_engine, fresh, ds_parallel, sampler, cfg, manual_clip, range(2, 3))
        result["resume_step_diff"] = _max_diff(_state(model), _state(fresh))
        result["files"] = sorted(p.name for p in (folder / "t2").iterdir()) if rank == 0 else []
        results.append(result)
    return results


def expert_resharding(rank: int, world: int, ckpt_root: str) -> dict:
    """A checkpoint saved at ep=2 loads into an ep=1 model (per-expert files are EP-independent)."""
    import moe_ep
    from moe_ep.integrations.deepspeed import deepspeed_parallel_state

    cfg = train_config()
    sampler = _sampler(cfg, rank, world)
    folder = str(Path(ckpt_root) / "reshard")
    parallel2 = deepspeed_parallel_state(2)
    engine2, model2, clip2 = _engine(parallel2, cfg, 0, seed=0, ep_size=2)
    _ds_steps(engine2, model2, parallel2, sampler, cfg, clip2, range(1))
    engine2.save_checkpoint(folder, tag="t")
    full = {}
    for i, layer in enumerate(moe_layers(model2)):
        full.update({f"{i}.{k}": v for k, v in layer.full_state_dict().items()})

    parallel1 = deepspeed_parallel_state(1)
    engine1, model1, _ = _engine(parallel1, cfg, 0, seed=5, ep_size=1)
    engine1.load_checkpoint(folder, tag="t", load_optimizer_states=False, load_lr_scheduler_states=False)
    loaded = {}
    for i, layer in enumerate(moe_layers(model1)):
        loaded.update({f"{i}.{k}": v for k, v in layer.state_dict().items()})
    dense2 = {k: v for k, v in _state(model2).items() if ".experts." not in k}
    dense1 = {k: v for k, v in _state(model1).items() if ".experts." not in k}
    return dict(expert_diff=_max_diff(full, loaded), dense_diff=_max_diff(dense2, dense1))


def wrapper_properties(rank: int, world: int) -> dict:
    """Marks, deepcopy, state dict layout and round trip, unwrap: on an ep=2 model."""
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param

    from moe_ep.integrations.deepspeed import (DS_EXPERT_PREFIX, DeepSpeedMoE, deepspeed_parallel_state,
                                               unwrap_moe_layers, wrap_moe_layers)
    from moe_ep.models import MoETransformerLM
    from moe_ep.training.deepspeed import optimizer_param_groups

    parallel = deepspeed_parallel_state(2)
    model = MoETransformerLM(model_config(), parallel, seed=0)
    plain_sd = {k: v.clone() for k, v in model.state_dict().items()}
    wrappers = wrap_moe_layers(model, 2)
    out = dict(n_wrappers=len(wrappers), is_moe=all(isinstance(w, MoE) for w in wrappers),
               group_names=sorted({w.expert_group_name for w in wrappers}))
    marked = [n for n, p in model.named_parameters() if is_moe_param(p)]
    out["marked"] = sorted({n.split(".moe.", 1)[1] for n in marked})
    out["marked_group"] = sorted({p.group_name for p in model.parameters() if is_moe_param(p)})

    # deepcopy: marks kept, tensors new, groups shared, the copy runs the all-to-all
    clone = copy.deepcopy(wrappers[0])
    out["copy_marks"] = all(getattr(p, "allreduce", True) is False and p.group_name == "ep_size_2"
                            for p in clone.expert_parameters())
    out["copy_is_new"] = all(a is not b and a.data_ptr() != b.data_ptr() and torch.equal(a, b)
                             for a, b in zip(clone.parameters(), wrappers[0].parameters()))
    out["copy_shares_group"] = clone.moe.parallel.ep_group is wrappers[0].moe.parallel.ep_group
    x = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        out["copy_forward_equal"] = torch.equal(clone(x), wrappers[0](x))
    reloaded = copy.deepcopy(wrappers[0])
    reloaded.load_state_dict(reloaded.state_dict(), assign=True)  # new Parameter objects
    out["assign_load_marks"] = all(is_moe_param(p) for p in reloaded.expert_parameters())

    # state dict layout: per-expert DeepSpeed keys, shared experts renamed, nothing else containing "expert"
    sd = model.state_dict()
    prefix = "layers.1.ffn."
    out["expert_keys"] = sorted(k[len(prefix):] for k in sd if k.startswith(prefix) and "expert" in k)
    layer = wrappers[0].moe
    out["slices_equal"] = all(torch.equal(sd[f"{prefix}{DS_EXPERT_PREFIX}{i}.w_in"], layer.experts.w_in[i])
                              for i in range(layer.experts.w_in.shape[0]))
    # round trip into a model with other weights, in both layouts
    other = MoETransformerLM(model_config(), parallel, seed=9)
    wrap_moe_layers(other, 2)
    other.load_state_dict(sd)
    out["ds_layout_round_trip"] = all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sd.values()))
    other2 = MoETransformerLM(model_config(), parallel, seed=9)
    wrap_moe_layers(other2, 2)
    other2.load_state_dict({k.replace("ffn.", "ffn.moe.", 1) if ".ffn." in k and "layers.0." not in k else k: v
                            for k, v in plain_sd.items()})
    out["plain_layout_load"] = all(torch.equal(a, b) for a, b in zip(other2.state_dict().values(), sd.values()))

    groups = optimizer_param_groups(model, 0.1)
    out["optimizer_groups"] = [(g["name"], bool(g.get("moe")), g["weight_decay"], len(g["params"])) for g in groups]

    unwrap_moe_layers(model)
    out["unwrapped_sd_equal"] = (model.state_dict().keys() == plain_sd.keys()
                                 and all(torch.equal(model.state_dict()[k], v) for k, v in plain_sd.items()))
    out["unwrapped_model_finds_layers"] = len(moe_layers(model))
    out["wrapper_type_ok"] = isinstance(wrappers[0], DeepSpeedMoE)
    return out


def checkpoint_conversion(rank: int, world: int, root: str) -> dict:
    """Engine checkpoint (ep 2) -> moe_ep format -> DeepSpeed files -> a fresh engine: weights equal throughout."""
    import torch.distributed as dist

    from moe_ep.training.convert import from_deepspeed, load_model, to_deepspeed
    from moe_ep.integrations.deepspeed import deepspeed_parallel_state

    cfg = train_config()
    sampler = _sampler(cfg, rank, world)
    parallel = deepspeed_parallel_state(2)
    engine, model, clip = _engine(parallel, cfg, 0, seed=0, ep_size=2)
    _ds_steps(engine, model, parallel, sampler, cfg, clip, range(1))
    engine.save_checkpoint(str(Path(root) / "engine"), tag="t")
    full = {k: v for k, v in _state(model).items() if ".experts." not in k}
    for name, layer in ((n.replace(PLAIN_NAME, "."), m) for n, m in model.named_modules() if m in moe_layers(model)):
        full.update({f"{name.removesuffix('.moe')}.{k}": v for k, v in layer.full_state_dict().items()
                     if k.startswith("experts.")})
    if rank == 0:  # conversions are single-process file operations
        from_deepspeed(Path(root) / "engine", Path(root) / "moe_ep", tag="t", model_config=model_config().to_dict())
        to_deepspeed(Path(root) / "moe_ep", Path(root) / "converted", tag="c")
    dist.barrier()
    converted = load_model(Path(root) / "moe_ep")
    from_engine = {k: v for k, v in converted.state_dict().items() if k in full}
    fresh_engine, fresh, _ = _engine(parallel, cfg, 0, seed=11, ep_size=2)
    before = _max_diff(_state(model), _state(fresh))
    fresh_engine.load_checkpoint(str(Path(root) / "converted"), tag="c", load_module_only=True)
    return dict(keys_equal=sorted(from_engine) == sorted(full), from_engine_diff=_max_diff(full, from_engine),
                before_load_diff=before, engine_load_diff=_max_diff(_state(model), _state(fresh)))


def traffic_under_rank_order(rank: int, world: int, data_before_expert: bool) -> dict:
    """Nodes spanned and traffic counters of an ep=2 layer on DeepSpeed's groups in the given rank order."""
    from moe_ep import MoEConfig, MoELayer
    from moe_ep.integrations.deepspeed import deepspeed_parallel_state

    parallel = deepspeed_parallel_state(2, use_data_before_expert_parallel_=data_before_expert)
    layer = MoELayer(MoEConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2),
                     parallel)
    layer(torch.randn(32, 16, generator=torch.Generator().manual_seed(rank)))
    traffic = {k: int(v) for k, v in layer.last_stats.as_dict().items() if k.endswith("rows_sent")}
    return dict(nodes=parallel.nodes, ep_group=torch.distributed.get_process_group_ranks(parallel.ep_group),
                **traffic)

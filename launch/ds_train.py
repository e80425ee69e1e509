"""Train the moe_ep language model through a DeepSpeed engine (the same model, data and metrics as launch/train.py).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/ds_train.py --deepspeed_config launch/ds_config.json \\
        --steps 300 --out runs/ds-tiny [--ep-size 2]

(``python -m torch.distributed.run --nproc_per_node 2 launch/ds_train.py ...`` works too.) The model is
built on DeepSpeed's expert groups (``moe_ep.integrations.deepspeed``), its MoE layers are wrapped as
``deepspeed.moe.layer.MoE`` and every optimizer step is ``engine.backward`` / ``engine.step`` followed by
the MoE bias update (or, for a step the fp16 loss scaler skipped, the MoE step discarded). From the
DeepSpeed config come the micro batch per rank (``train_micro_batch_size_per_gpu``), the micro-batches per
optimizer step (``gradient_accumulation_steps``), the precision (``bf16`` / ``fp16`` sections:
launch/ds_config_bf16.json, launch/ds_config_fp16.json), the peak learning rate, betas, eps and weight decay
(AdamW params), the gradient clipping and the ZeRO stage (0, 1 or 2); the warmup + cosine schedule of the
plain loop is applied by this script each step. ``--activation-checkpointing`` checkpoints every transformer
block. Outputs in ``--out``: ``run.json``, ``metrics.jsonl`` (the fields of ``moe_ep/training/metrics.py``),
``loss.png``, ``expert_load.png`` and, with ``--ckpt-every``, DeepSpeed checkpoints under ``ds_ckpt/``
(``--resume`` continues from the latest). ``--init-from CKPT`` continues from a moe_ep checkpoint of
launch/train.py written at any layout. docs/deepspeed.md has the details.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported
if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
    # The deepspeed launcher (unlike torchrun) leaves threads unset: share the cores between the local ranks,
    # or the ranks oversubscribe the CPU and gloo collectives crawl.
    local_procs = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moe_ep.checkpoint import restore_training_state  # noqa: E402
from moe_ep.data import BatchSampler  # noqa: E402
from moe_ep.activation_checkpointing import enable_activation_checkpointing  # noqa: E402
from moe_ep.integrations.deepspeed import (deepspeed_parallel_state, deepspeed_precision,  # noqa: E402
                                           grad_clip_plan, moe_layers, optimizer_param_groups, train_step,
                                           undo_initial_optimizer_step, wrap_moe_layers)
from moe_ep.training import TrainConfig, evaluate, plot_run  # noqa: E402
from moe_ep.training.cli import (LOOP_FLAGS, add_model_arguments, add_run_arguments,  # noqa: E402
                                 add_schedule_arguments, blame, check_checkpoint_folder, check_model_arguments,
                                 check_run_arguments, seq_len)
from moe_ep.training.metrics import IntervalMeter, MetricsLog, ProgressBar  # noqa: E402
from moe_ep.training.model_source import build_model, default_seq_len, run_record, save_hf  # noqa: E402
from moe_ep.training.optim import lr_at  # noqa: E402

_DEFAULTS = TrainConfig()
CKPT_DIR = "ds_ckpt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    add_model_arguments(p)
    add_schedule_arguments(p)
    add_run_arguments(p, out_default="runs/ds-train",
                      ckpt_help="steps between DeepSpeed checkpoints (OUT/ds_ckpt); 0: none (default)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/ds_ckpt")
    p.add_argument("--init-from", default=None, metavar="CKPT_DIR",
                   help="continue from a moe_ep checkpoint (launch/train.py's, any layout): weights, V3 bias, step "
                        "and data position; AdamW moments too when DeepSpeed runs torch's AdamW on the model's "
                        "parameters (ZeRO stage 0), else they restart from zero")
    return deepspeed.add_config_arguments(p)


def parse_args(argv=None) -> argparse.Namespace:
    """The flags and the DeepSpeed config, checked before any work (``moe_ep.training.cli``): one that cannot work
    exits with status 2."""
    p = build_parser()
    args = p.parse_args(argv)
    if not args.deepspeed_config:
        p.error("argument --deepspeed_config: is required (e.g. launch/ds_config.json)")
    if args.resume and args.init_from:
        p.error("argument --init-from: excludes --resume (--resume continues DeepSpeed's checkpoints, --init-from "
                "a moe_ep checkpoint)")
    model = check_model_arguments(p, args)
    with blame(p, "--deepspeed_config"):
        ds_config = read_ds_config(args.deepspeed_config)
        grad_clip_plan(ds_config)
        deepspeed_precision(ds_config)
        ds_fields = config_fields(ds_config, args.deepspeed_config)
    with blame(p, {**LOOP_FLAGS, **dict.fromkeys(ds_fields, "--deepspeed_config")}):
        cfg = train_config(args, ds_fields, seq_len(args, default_seq_len(args)))
    check_run_arguments(p, args, cfg, model)
    if args.resume and not (Path(args.out) / CKPT_DIR / "latest").is_file():
        p.error(f"argument --resume: no DeepSpeed checkpoint under {Path(args.out) / CKPT_DIR} (no 'latest' file)")
    if args.init_from:
        if args.hf_model:
            p.error("argument --init-from: takes a moe_ep checkpoint of a preset model; it does not apply to "
                    "--hf-model")
        check_checkpoint_folder(p, "--init-from", args.init_from)
    return args


def read_ds_config(path: str) -> dict:
    """The DeepSpeed config file as a dict; ``ValueError`` / ``OSError`` when it does not read as a JSON object."""
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def config_fields(ds_config: dict, path: str) -> dict:
    """The ``TrainConfig`` fields the DeepSpeed config sets: batch per rank and step, micro-batches, AdamW settings,
    clipping; ``ValueError`` naming ``path`` when it lacks them or they are not numbers."""
    optimizer = ds_config.get("optimizer", {})
    if optimizer.get("type", "").lower() not in ("adamw", "adam"):
        raise ValueError(f"{path}: optimizer.type must be AdamW (the plain loop's optimizer)")
    params = optimizer.get("params", {})
    if "train_micro_batch_size_per_gpu" not in ds_config:
        raise ValueError(f"{path}: set train_micro_batch_size_per_gpu (sequences per rank)")
    try:
        accum = int(ds_config.get("gradient_accumulation_steps", 1))
        beta1, beta2 = (float(b) for b in params.get("betas", (_DEFAULTS.beta1, _DEFAULTS.beta2)))
        # the plain loop's batch_size is per rank per optimizer step: the micro-batches of one step
        return dict(batch_size=int(ds_config["train_micro_batch_size_per_gpu"]) * accum, grad_accum=accum,
                    lr=float(params.get("lr", _DEFAULTS.lr)), weight_decay=float(params.get("weight_decay", 0.0)),
                    beta1=beta1, beta2=beta2, grad_clip=float(ds_config.get("gradient_clipping", 0.0) or 0.0) or None)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def train_config(args: argparse.Namespace, ds_fields: dict, seq_len: int) -> TrainConfig:
    """The plain loop's ``TrainConfig``: the schedule and run flags, and ``ds_fields`` (``config_fields``)."""
    return TrainConfig(steps=args.steps, activation_checkpointing=args.activation_checkpointing, seq_len=seq_len,
                       min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup, log_every=args.log_every,
                       val_every=args.val_every, ckpt_every=args.ckpt_every, val_batches=args.val_batches,
                       seed=args.seed, out_dir=args.out, **ds_fields)


def main(argv=None) -> None:
    args = parse_args(argv)
    ds_config = read_ds_config(args.deepspeed_config)
    engine_config, manual_clip = grad_clip_plan(ds_config)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    precision = deepspeed_precision(ds_config)

    parallel = deepspeed_parallel_state(args.ep_size, nodes=args.nodes)
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = train_config(args, config_fields(ds_config, args.deepspeed_config), seq_len(args, default_seq_len(args)))
    out_dir = Path(cfg.out_dir)

    torch.manual_seed(cfg.seed + rank)  # training-time noise (router jitter); weights have their own seeds
    source = build_model(args, parallel, device, seed=cfg.seed)
    model, corpus = source.model, source.corpus
    sampler = BatchSampler(corpus, cfg.batch_size, cfg.seq_len, cfg.seed, rank, parallel.world_size)
    restored = None
    if args.init_from:
        restored = restore_training_state(Path(args.init_from), model, sampler, parallel, cfg)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    wrap_moe_layers(model, args.ep_size)
    engine, _, _, _ = deepspeed.initialize(model=model, config=engine_config,
                                           model_parameters=optimizer_param_groups(model, cfg.weight_decay))
    undo_initial_optimizer_step(engine)  # bf16 at ZeRO 0: DeepSpeed's wrapper took an AdamW step at construction

    start = 0
    if restored is not None:
        start = restored.step
        if isinstance(engine.optimizer, torch.optim.AdamW):
            restored.load_optimizer(engine.optimizer)
        elif rank == 0:
            print(f"[moe_ep/deepspeed] --init-from: {type(engine.optimizer).__name__} keeps AdamW state in its own "
                  f"partitions; the moments restart from zero (weights, step and data position are restored)",
                  flush=True)
    if args.resume:
        load_path, client_state = engine.load_checkpoint(str(out_dir / CKPT_DIR))
        if load_path is None:
            raise SystemExit(f"--resume: no DeepSpeed checkpoint under {out_dir / CKPT_DIR}")
        # the data position is saved by rank 0 (layout-free); every rank checks it against its own sampler
        start = sampler.check_resume(client_state["data"])
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_info = run_record(source.info, cfg, parallel, device, corpus,
                              deepspeed=dict(version=deepspeed.__version__, zero_stage=stage, precision=precision,
                                             config=ds_config,
                                             clipping="moe_ep.clip_gradients" if manual_clip else "deepspeed"),
                              resumed_at_step=start or None, init_from=args.init_from)
        (out_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[moe_ep/deepspeed] {args.hf_model or args.preset}: {n_params / 1e6:.2f}M parameters on rank 0, "
              f"world {parallel.world_size} (dp {parallel.dp_size} x ep {parallel.ep_size}), ZeRO stage {stage}, "
              f"{precision}, {cfg.grad_accum} micro-batch(es) per step, {device}", flush=True)

    log = MetricsLog(out_dir / "metrics.jsonl", enabled=rank == 0, start_step=start)
    val_batches = [b.to(device) for b in sampler.val_batches(cfg.val_batches)]
    moe = moe_layers(model)
    meter = IntervalMeter(len(moe), moe[0].config.n_routed_experts,
                          cfg.batch_size * cfg.seq_len * parallel.world_size, device)
    bar = ProgressBar(cfg.steps, start, enabled=rank == 0)
    val_losses: dict[int, float] = {}
    engine.train()
    for step in range(start, cfg.steps + 1):
        last = step == cfg.steps
        record = {}
        if step > start and (step % cfg.log_every == 0 or last):
            record.update(meter.flush(parallel))
        if step == start or step % cfg.val_every == 0 or last:
            val_losses[step] = record["val_loss"] = evaluate(model, val_batches, parallel)
        if record:
            log.write(dict(step=step, **record))
            bar.show(record)
        if cfg.ckpt_every and step > start and (step % cfg.ckpt_every == 0 or last):
            engine.save_checkpoint(str(out_dir / CKPT_DIR), tag=f"step_{step:04d}",
                                   client_state=dict(data=sampler.state_dict(step), train_config=cfg.to_dict(),
                                                     model_config=source.info))
        if last:
            break
        meter.begin_step()
        batch = sampler.batch(step).to(device, non_blocking=True)
        lr = lr_at(step, cfg)
        meter.add(train_step(engine, model, batch, lr, parallel, manual_clip), lr)
        bar.advance()
    bar.close()

    if rank == 0:
        plots = plot_run(out_dir)
        first, final = min(val_losses), max(val_losses)
        print(f"[moe_ep/deepspeed] val loss {val_losses[first]:.3f} (step {first}) -> {val_losses[final]:.3f} "
              f"(step {final})", flush=True)
        print(f"[moe_ep/deepspeed] metrics: {out_dir / 'metrics.jsonl'}", flush=True)
        for path in plots:
            print(f"[moe_ep/deepspeed] plot: {path}", flush=True)
    if args.save_hf:
        save_hf(source, args.save_hf)
        if rank == 0:
            print(f"[moe_ep/deepspeed] transformers model: {args.save_hf}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Rank functions of tests/parallel/test_pipeline.py (run by ``run_on_ranks``, or in-process for one rank).

The model: the ``tiny`` preset at width 32 with 4 blocks (1 dense + 3 MoE, 8 experts top-2, the V3 bias on,
a sequence-wise aux loss), tied embeddings; the global batch is 8 sequences of 16 bytes at every layout, in
``N_MICRO`` micro-batches (``--grad-accum``; the pipeline's micro-batches). Results are plain Python values.
"""
from __future__ import annotations

from pathlib import Path

GLOBAL_BATCH, SEQ, N_MICRO, STEPS, SHORT = 8, 16, 4, 10, 2
CKPT_STEPS, RESUME_AT = 6, 3
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zbv", "dualpipev")
# The schedules that also run with activation checkpointing and bf16: each stage placement (1f1b: a stage per
# rank; zbv and dualpipev: two stages per rank in a V, where a recompute may run twice).
VARIANT_SCHEDULES = ("1f1b", "zbv", "dualpipev")


def save_hf_model(folder: str) -> None:
    """A tiny transformers DeepSeek-V3 causal LM (4 decoder layers, untied embeddings) saved to ``folder``."""
    from ..hf_tiny import tiny_model

    model = tiny_model("v3", vocab_size=256, num_hidden_layers=4, tie_word_embeddings=False)
    model.save_pretrained(folder)


def model_config():
    from moe_ep.models import ModelConfig

    base = ModelConfig.preset("tiny")
    moe = base.moe.replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                           aux_free_bias=True, bias_update_rate=1e-2, seq_balance_coef=1e-2,
                           expert_balance_coef=1e-2)
    return base.replace(hidden_size=32, n_layers=4, n_heads=2, dense_intermediate_size=64, max_seq_len=SEQ,
                        first_k_dense=1, tie_embeddings=True, moe=moe)


def train_config(data_ranks: int, steps: int = STEPS, out_dir: str = "unused", **fields):
    from moe_ep.training import TrainConfig

    return TrainConfig(steps=steps, batch_size=GLOBAL_BATCH // data_ranks, seq_len=SEQ, grad_accum=N_MICRO,
                       lr=1e-2, warmup_steps=2, log_every=1, val_every=100, val_batches=1, ckpt_every=RESUME_AT,
                       out_dir=str(out_dir), **fields)


def _parallel(ep_size: int, pp_size: int, world: int):
    import moe_ep

    return moe_ep.init_expert_parallel(ep_size=ep_size, pp_size=pp_size) if world > 1 else moe_ep.ParallelState()


def _sampler(cfg, parallel):
    from moe_ep.data import load_corpus
    from moe_ep.training.runs import sampler_for

    return sampler_for(load_corpus(max_bytes=1 << 18), cfg, parallel)


def _trainer(parallel, cfg, schedule: str | None, overlap: bool = False):
    """A ``PipelineTrainer`` (``schedule``) or, for None, the plain trainer of the whole model."""
    from moe_ep.models import MoETransformerLM
    from moe_ep.training import PlainTrainer
    from moe_ep.training.pipeline import PipelineTrainer

    if schedule is None:
        return PlainTrainer(MoETransformerLM(model_config(), parallel, seed=cfg.seed), parallel, cfg)
    return PipelineTrainer(model_config(), parallel, cfg, _device(), cfg.seed, schedule, overlap_fb=overlap)


def _device():
    import torch

    return torch.device("cpu")


def _steps(trainer, sampler, steps: int) -> list[dict]:
    """Each step's reported ce, aux, grad norm and per-layer expert loads, then the validation loss."""
    records = []
    for step in range(steps):
        result = trainer.train_step(sampler.batch(step), step)
        loads = [[s.tokens_per_expert.tolist() for s in micro] for micro in result.stats]
        records.append(dict(ce=float(result.ce), aux=float(result.aux), grad_norm=float(result.grad_norm),
                            loads=loads))
    records.append(dict(val=trainer.evaluate([b for b in sampler.val_batches(1)], trainer.parallel)))
    return records


def _state(trainer) -> dict:
    """The rank's parameters and buffers as float64 numpy arrays (full-model names)."""
    return {name: t.detach().double().numpy().copy() for name, t in trainer.model.state_dict().items()}


VARIANTS = {"ckpt": dict(activation_checkpointing=True), "bf16": dict(precision="bf16")}


def _runs(parallel, data_ranks: int, schedules, variants=VARIANTS) -> dict:
    """fp32 over STEPS for each schedule (None: the plain trainer), and each of ``variants`` (activation
    checkpointing, bf16) over SHORT steps for the plain trainer and ``VARIANT_SCHEDULES`` (not overlapped)."""
    out = {}
    for schedule, overlap in schedules:
        key = f"{schedule}+overlap" if overlap else str(schedule)
        cfg = train_config(data_ranks)
        trainer = _trainer(parallel, cfg, schedule, overlap)
        out[key] = dict(fp32=_steps(trainer, _sampler(cfg, parallel), STEPS), state=_state(trainer))
        for variant, fields in (variants.items() if schedule in (None,) + VARIANT_SCHEDULES and not overlap else ()):
            cfg = train_config(data_ranks, **fields)
            out[key][variant] = _steps(_trainer(parallel, cfg, schedule, overlap), _sampler(cfg, parallel), SHORT)
    if "dualpipev" in out and "dualpipev+overlap" in out:
        plain, overlapped = out["dualpipev"].pop("state"), out["dualpipev+overlap"].pop("state")
        out["overlap_weight_diff"] = max(float(abs(plain[k] - overlapped[k]).max()) for k in plain)
    for value in out.values():
        if isinstance(value, dict):
            value.pop("state", None)
    return out


def _counting_hand_overs() -> list[int]:
    """Count, in this process, the turns the overlapped forward and backward hand each other (``[count]``)."""
    from moe_ep.parallel import turns

    count, original = [0], turns.Turns.hand_over

    def counted(self) -> None:
        count[0] += 1
        original(self)

    turns.Turns.hand_over = counted
    return count


def hf_runs(parallel, folder: str, schedules) -> dict:
    """The transformers DeepSeek-V3 model of ``folder`` made expert-parallel, SHORT fp32 steps per schedule
    (None: the plain trainer of the whole model)."""
    from moe_ep.hf_model import load_causal_lm
    from moe_ep.training import PlainTrainer
    from moe_ep.training.pipeline import PipelineTrainer

    out = {}
    for schedule, overlap in schedules:
        cfg = train_config(parallel.world_size)
        model = load_causal_lm(folder, parallel, seq_balance_coef=1e-2)
        trainer = PlainTrainer(model, parallel, cfg) if schedule is None else \
            PipelineTrainer(model, parallel, cfg, _device(), schedule=schedule, overlap_fb=overlap)
        out[f"{schedule}+overlap" if overlap else str(schedule)] = _steps(trainer, _sampler(cfg, parallel), SHORT)
    return out


def driver_run(parallel, out_dir: str, schedule: str | None, resume_from: str | None = None) -> None:
    """The driver over CKPT_STEPS steps with a checkpoint every RESUME_AT, from scratch or resumed."""
    from moe_ep.training import run

    cfg = train_config(parallel.world_size, CKPT_STEPS, out_dir)
    run(_trainer(parallel, cfg, schedule), _sampler(cfg, parallel), parallel, cfg,
        resume=Path(resume_from) if resume_from else None)


def pipelined(rank: int, world: int, root: str) -> dict:
    """4 processes: every schedule at pp 2 x ep 2 (fp32; activation checkpointing and bf16 for
    ``VARIANT_SCHEDULES``), the transformers model of ``root/hf`` at pp 2 x ep 2 (1f1b, dualpipev overlapped),
    every schedule at pp 2 x dp 2 x ep 1 (fp32); then
    the checkpointed driver run at
    pp 2 x ep 2 (1f1b), resumed in the same processes under dualpipev (the other stage placement)."""
    results = {}
    parallel = _parallel(2, 2, world)
    hand_overs = _counting_hand_overs()
    results["pp2_ep2"] = _runs(parallel, 2, [(s, False) for s in SCHEDULES] + [("dualpipev", True)])
    results["hand_overs"] = hand_overs[0]
    results["hf"] = hf_runs(parallel, str(Path(root) / "hf"), [("1f1b", False), ("dualpipev", True)])
    parallel = _parallel(1, 2, world)
    results["pp2_dp2"] = _runs(parallel, 2, [(s, False) for s in SCHEDULES], variants={})
    parallel = _parallel(2, 2, world)
    driver_run(parallel, str(Path(root) / "pp2_ep2"), "1f1b")
    driver_run(parallel, str(Path(root) / "resumed_pp2_dualpipev"), "dualpipev", _checkpoint(root))
    results["pp_rank"], results["data_rank"] = parallel.pp_rank, parallel.data_rank
    return results


def references(rank: int, world: int, root: str) -> dict:
    """2 processes: the plain trainer at ep 2 (also of the transformers model) and at dp 2 x ep 1; then the pp 2
    checkpoint resumed at ep 2."""
    parallel = _parallel(2, 1, world)
    results = {"ep2": _runs(parallel, 2, [(None, False)])["None"],
               "hf": hf_runs(parallel, str(Path(root) / "hf"), [(None, False)])["None"],
               "dp2": _runs(_parallel(1, 1, world), 2, [(None, False)], variants={})["None"]}
    driver_run(_parallel(2, 1, world), str(Path(root) / "resumed_pp1_ep2"), None, _checkpoint(root))
    return results


def resume_in_one_process(root: str) -> None:
    """This process, no process group: the pp 2 checkpoint resumed at pp 1 x ep 1."""
    driver_run(_parallel(1, 1, 1), str(Path(root) / "resumed_pp1_ep1"), None, _checkpoint(root))


def _checkpoint(root: str) -> str:
    return str(Path(root) / "pp2_ep2" / "ckpt" / f"step_{RESUME_AT:04d}")

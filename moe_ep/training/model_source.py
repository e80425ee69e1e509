"""What the launchers train: a preset ``MoETransformerLM``, or a transformers DeepSeek causal LM (``--hf-model``).

Both launchers (launch/train.py, launch/ds_train.py) call ``build_model`` with
their parsed arguments; it reads ``hf_model``, ``preset``, ``moe`` (the
``--moe FIELD=VALUE`` overrides), ``mtp_depth``, ``data``, ``max_data_bytes`` and ``save_hf``.

* Preset: ``MoETransformerLM(ModelConfig.preset(preset) with the overrides and ``mtp_depth``)``
  on the byte corpus of ``moe_ep.data.load_corpus``.
* ``--upcycle-from DENSE_CKPT`` (launch/train.py; ``upcycle_from``,
  ``upcycle``, ``first_k_dense``): the checkpoint's dense model made MoE by
  ``moe_ep.models.upcycle`` (its own config, the ``--moe`` overrides for the
  MoE fields), on the byte corpus.
* ``--hf-model DIR``: ``moe_ep.hf_model.load_causal_lm(DIR, parallel, **overrides)``
  in fp32 (the trainers keep fp32 weights): ``from_pretrained``, KV cache off,
  made expert-parallel on the CPU (only this rank's experts reach the
  device), then moved to the device.
  Data: the byte corpus when the model's vocabulary has at least 256 entries
  (bytes are valid ids); otherwise the same text encoded by the folder's
  tokenizer (``tokenize_corpus``).
* ``--save-hf DIR`` (``save_hf``, collective): the trained model as a
  transformers folder, plus the tokenizer when the run used one.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..checkpoint import CheckpointError, find_checkpoint, read_manifest
from ..checkpoint.manifest import MANIFEST
from ..data import VOCAB_SIZE, Corpus, load_corpus, tokenize_corpus
from ..hf_model import load_causal_lm, save_pretrained
from ..models import ModelConfig, MoETransformerLM
from ..models.upcycle import upcycle, upcycled_config
from ..parallel.state import ParallelState
from .checkpoints import load_model, model_config_from
from .config import TrainConfig, parse_field_overrides


@dataclass
class ModelSource:
    """The model on its device, its corpus, the tokenizer (None: bytes) and its description for run.json."""

    model: nn.Module
    corpus: Corpus
    tokenizer: Any
    info: dict


def default_seq_len(args: argparse.Namespace) -> int:
    """The preset's (or upcycled checkpoint's) ``max_seq_len``; ``TrainConfig``'s default for a transformers model."""
    if getattr(args, "upcycle_from", None):
        return dense_checkpoint(args.upcycle_from)[1].max_seq_len
    return TrainConfig.seq_len if args.hf_model else ModelConfig.preset(args.preset).max_seq_len


def dense_checkpoint(path: str) -> tuple[Path, ModelConfig]:
    """The checkpoint at or under ``path`` (``--upcycle-from``: a checkpoint or a run folder) and its model's config.

    ``CheckpointError`` naming the folder or field when there is none or its manifest does not read.
    """
    folder = find_checkpoint(Path(path))
    if folder is None:
        raise CheckpointError(f"{path} is neither a complete checkpoint ({MANIFEST}) nor a run folder with one "
                              f"under ckpt/")
    return folder, model_config_from(read_manifest(folder)["model_config"], str(folder / MANIFEST))


def upcycle_segments(args: argparse.Namespace) -> Optional[int]:
    """``--upcycle``'s m: None for ``coarse`` (the default), m for ``fine m``."""
    return (args.upcycle or ("coarse", None))[1]


def upcycled_model(args: argparse.Namespace, parallel: ParallelState, seed: int) -> MoETransformerLM:
    """``--upcycle-from``'s dense model made MoE (``moe_ep.models.upcycle``; ``seed`` draws the routers), on the CPU.

    The flags were checked by ``cli.check_upcycle_arguments``. Collective (loading the checkpoint).
    """
    folder, dense_config = dense_checkpoint(args.upcycle_from)
    config = upcycled_config(dense_config, upcycle_segments(args), args.first_k_dense, parse_field_overrides(args.moe))
    return upcycle(load_model(folder, parallel), config, parallel, seed)


def preset_config(preset: str, moe_flags: list[str], mtp_depth: int = 0) -> ModelConfig:
    """``ModelConfig.preset(preset)`` with the ``--moe FIELD=VALUE`` overrides applied to its MoE config and
    ``mtp_depth`` MTP modules (``--mtp-depth``)."""
    base = ModelConfig.preset(preset)
    return base.replace(moe=base.moe.replace(**parse_field_overrides(moe_flags)), mtp_depth=mtp_depth)


def run_record(model_info: dict, cfg: TrainConfig, parallel: ParallelState, device: torch.device, corpus: Corpus,
               **extra: Any) -> dict:
    """A launcher's ``run.json``: the model, the training config, the layout, the device, the corpus, ``extra``."""
    return dict(model=model_info, train=cfg.to_dict(), world_size=parallel.world_size * parallel.pp_size,
                pp_size=parallel.pp_size, ep_size=parallel.ep_size, dp_size=parallel.dp_size, device=str(device),
                data=dict(source=corpus.source, train_tokens=corpus.train.numel(), val_tokens=corpus.val.numel(),
                          fingerprint=corpus.fingerprint), **extra)


def build_model(args: argparse.Namespace, parallel: ParallelState, device: torch.device, seed: int) -> ModelSource:
    """The launchers' model and corpus (see the module docstring); ``seed`` initialises a preset model."""
    if args.save_hf and not args.hf_model:
        raise SystemExit("--save-hf needs --hf-model (a preset model is not a transformers model)")
    if not args.hf_model:
        model = upcycled_model(args, parallel, seed) if getattr(args, "upcycle_from", None) else \
            MoETransformerLM(preset_config(args.preset, args.moe, args.mtp_depth), parallel, seed=seed)
        return ModelSource(model.to(device), load_corpus(args.data, max_bytes=args.max_data_bytes), None,
                           model.config.to_dict())
    overrides = parse_field_overrides(args.moe)
    model = load_causal_lm(args.hf_model, parallel, **overrides).to(device)
    corpus, tokenizer = hf_corpus(args.hf_model, model.config.vocab_size, args.data, args.max_data_bytes)
    info = dict(hf_model=args.hf_model, config=model.config.to_dict(), moe_overrides=overrides)
    return ModelSource(model, corpus, tokenizer, info)


def hf_corpus(folder: str, vocab_size: int, data: str | None, max_bytes: int) -> tuple[Corpus, Any]:
    """(corpus, tokenizer or None) for a model of ``vocab_size`` tokens from ``folder`` (module docstring)."""
    corpus = load_corpus(data, max_bytes=max_bytes)
    if vocab_size >= VOCAB_SIZE:
        return corpus, None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise SystemExit(f"--hf-model {folder}: the vocabulary has {vocab_size} < {VOCAB_SIZE} entries, so bytes "
                         f"are not valid ids, and the folder's tokenizer does not load: {err}") from err
    if len(tokenizer) > vocab_size:
        raise SystemExit(f"--hf-model {folder}: the tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"vocab_size {vocab_size}")
    return tokenize_corpus(corpus, tokenizer), tokenizer


def save_hf(source: ModelSource, folder: str) -> None:
    """Write the trained transformers model (and the tokenizer, if the run used one) to ``folder``; collective."""
    save_pretrained(source.model, folder, tokenizer=source.tokenizer)

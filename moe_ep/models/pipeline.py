"""One rank's part of a pipelined ``MoETransformerLM``: its stages, and one module with the full model's names.

The model's ``n_layers`` blocks are cut into ``n_stages`` contiguous runs (``split_blocks``; balanced, or
the counts given); stage 0 also holds the embedding, the last stage the final norm and the output head.
A rank holds one stage or several (interleaved and V schedules), each an ``MoETransformerLM`` built with
its ``StageSpec`` (the same parameter names and initial values as the full model's).

``PipelineModel`` is this rank's part as one module: the stages' embedding, blocks (``layers.<i>``),
norm and head registered under the full model's names, so ``state_dict()``, ``named_parameters()``,
``moe_layers()`` and the checkpoints see the rank's share of the full model, whatever the layout. With tied
embeddings the output head is the embedding: on a rank that holds the first and the last stage (V
schedules) the last stage uses the first stage's ``embed`` itself; on another rank the last stage holds a
copy under the same name (``embed.weight``), whose gradient the pipeline trainer sums with the first
stage's, so the two stay equal. The MTP modules (``mtp_depth`` > 0, ``moe_ep.models.mtp``) live on the last
stage and read the embedding: it is shared or copied there the same way, tied or not.

``RankStages`` is what the pipeline trainer takes of any model's part: ``lm_rank_stages`` makes it for an
``MoETransformerLM``, ``moe_ep.models.hf_pipeline.hf_rank_stages`` for a transformers DeepSeek model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn

from ..parallel.state import ParallelState
from .config import ModelConfig
from .transformer import MoETransformerLM, StageSpec


def split_blocks(n_layers: int, n_stages: int, counts: Optional[Sequence[int]] = None) -> list[range]:
    """The blocks of each stage: ``counts[s]`` blocks for stage ``s`` when given (they must sum to
    ``n_layers``), else as even as possible (the first ``n_layers % n_stages`` stages one more)."""
    if counts is None:
        if n_stages > n_layers:
            raise ValueError(f"{n_stages} pipeline stages for {n_layers} blocks: each stage needs a block "
                             f"(use fewer stages, or give --pp-layers)")
        base, extra = divmod(n_layers, n_stages)
        counts = [base + (s < extra) for s in range(n_stages)]
    if len(counts) != n_stages or sum(counts) != n_layers or any(c < 0 for c in counts):
        raise ValueError(f"pipeline layer split {list(counts)}: needs {n_stages} non-negative counts summing to "
                         f"the model's {n_layers} blocks")
    starts = [sum(counts[:s]) for s in range(n_stages)]
    return [range(start, start + count) for start, count in zip(starts, counts)]


@dataclass
class RankStages:
    """What a pipeline trainer needs of one rank's part of a model, whatever the model.

    module: the rank's parameters and buffers under the whole model's names (``state_dict``,
        ``named_parameters``, ``moe_layers``, checkpoints); stages: its stage modules by global index, each
        ``stage(x)``: ids or hidden states in, hidden states or (last stage) logits out; hidden_size,
        vocab_size, n_layers: of the whole model; tied: the embedding this rank holds when the last stage uses it too
        (tied embeddings, MTP modules): the first stage's, or the last stage's copy of it; None otherwise;
        tied_copy: that copy, when it is one (its gradient is summed with the first stage's).
    """

    module: nn.Module
    stages: dict[int, nn.Module]
    hidden_size: int
    vocab_size: int
    n_layers: int
    tied: Optional[nn.Parameter] = None
    tied_copy: Optional[nn.Parameter] = None


def lm_rank_stages(config: ModelConfig, parallel: ParallelState, seed: int, stage_indices: Sequence[int],
                   blocks: Sequence[range]) -> RankStages:
    """This rank's stages of the ``MoETransformerLM`` of ``config`` and ``seed`` (``PipelineModel``)."""
    model = PipelineModel(config, parallel, seed, stage_indices, blocks)
    tied = model.embed.weight if config.last_stage_embeds and model.embed is not None else None
    return RankStages(module=model, stages=model.stages, hidden_size=config.hidden_size,
                      vocab_size=config.vocab_size, n_layers=config.n_layers, tied=tied, tied_copy=model.tied_copy)


class PipelineModel(nn.Module):
    """This rank's stages of the model (``stages``, by global stage index) and their parameters under the full
    model's names (module docstring). Not called itself: the pipeline schedule runs the stages."""

    def __init__(self, config: ModelConfig, parallel: ParallelState, seed: int, stage_indices: Sequence[int],
                 blocks: Sequence[range]):
        super().__init__()
        self.config, self.parallel = config, parallel
        n_stages = len(blocks)
        self.stages: dict[int, MoETransformerLM] = {}
        for index in stage_indices:
            spec = StageSpec(blocks[index], first=index == 0, last=index == n_stages - 1)
            self.stages[index] = MoETransformerLM(config, parallel, seed, stage=spec)
        first, last = self.stages.get(0), self.stages.get(n_stages - 1)
        if first is not None and last is not None and last is not first and config.last_stage_embeds:
            last.embed = first.embed  # the head (tied) and the MTP modules use the embedding itself on this rank
        # the full model's names: embedding, blocks, norm, head of whichever local stage holds them
        embed_owner = first if first is not None else last
        self.embed = embed_owner.embed if embed_owner is not None else None
        self.layers = nn.ModuleDict({key: block for stage in self.stages.values() for key, block in
                                     stage.layers.items()})
        self.norm = last.norm if last is not None else None
        self.lm_head = last.lm_head if last is not None else None
        self.mtp = last.mtp if last is not None else None

    @property
    def tied_copy(self) -> Optional[nn.Parameter]:
        """The last stage's own copy of the embedding (tied, or for MTP) on a rank without the first stage, else
        None."""
        if self.config.last_stage_embeds and 0 not in self.stages and self.embed is not None:
            return self.embed.weight
        return None

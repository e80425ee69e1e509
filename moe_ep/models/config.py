"""``ModelConfig``: shape of the decoder-only MoE language model, with presets.

The model is ``n_layers`` pre-norm blocks (attention, then an FFN); the
first ``first_k_dense`` blocks use a dense SwiGLU FFN of width
``dense_intermediate_size`` and the rest an ``MoELayer`` built from ``moe``
(whose ``hidden_size`` must equal ``hidden_size``). Presets:

* ``tiny``: a byte-level model that trains in minutes on two CPU cores.
* ``tiny-dense``: ``tiny`` with every block dense (``first_k_dense =
  n_layers``, no MoE layer): the dense model of the same shape.
* ``v2-lite-mini``: DeepSeek-V2-Lite's MoE structure (2 shared + 64 routed
  experts, 6 active, greedy softmax routing, alpha_1 = 0.001, first layer
  dense, untied embeddings) at width 256.
* ``v3-mini``: DeepSeek-V3's MoE structure (1 shared + 64 routed experts, 8
  active, sigmoid scores, 8 node-limited groups with 4 kept, scale 2.5,
  aux-free bias with gamma 1e-3, sequence-wise alpha 1e-4) at width 256.

Attention is plain multi-head attention with RoPE in every preset (the
DeepSeek models use MLA, which this package does not implement).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import MoEConfig


@dataclass
class ModelConfig:
    """Shape of ``MoETransformerLM``.

    vocab_size: token ids are ``[0, vocab_size)`` (256 for bytes).
    hidden_size / n_layers / n_heads: width, depth, attention heads.
    first_k_dense: leading blocks with a dense FFN (DeepSeek's
        ``first_k_dense_replace``); the other blocks are MoE.
    dense_intermediate_size: width of the dense SwiGLU FFN.
    max_seq_len: longest input (RoPE table size) and the default training length.
    rope_theta: RoPE base.
    tie_embeddings: share the input embedding with the output projection.
    norm_eps: RMSNorm epsilon.
    moe: configuration of every MoE layer.
    mtp_depth: DeepSeek-V3's multi-token prediction modules after the model (0: none;
        ``moe_ep.models.mtp``); the model's function (its logits) does not depend on them.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 4
    first_k_dense: int = 1
    dense_intermediate_size: int = 192
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp_depth: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig.{name}: {why}")

        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "dense_intermediate_size", "max_seq_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, name, f"must be a positive int, got {value!r}")
        need(isinstance(self.mtp_depth, int) and self.mtp_depth >= 0, "mtp_depth",
             f"must be a non-negative int, got {self.mtp_depth!r}")
        need(0 <= self.first_k_dense <= self.n_layers, "first_k_dense",
             f"must lie in [0, n_layers={self.n_layers}], got {self.first_k_dense}")
        need(self.hidden_size % self.n_heads == 0, "n_heads",
             f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        need((self.hidden_size // self.n_heads) % 2 == 0, "n_heads", "RoPE needs an even head dimension")
        need(self.moe.hidden_size == self.hidden_size, "moe",
             f"moe.hidden_size {self.moe.hidden_size} differs from hidden_size {self.hidden_size}")

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_k_dense

    @property
    def last_stage_embeds(self) -> bool:
        """Whether the output end of the model uses the embedding (tied head, or the MTP modules' inputs)."""
        return self.tie_embeddings or self.mtp_depth > 0

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain nested dict (JSON- and checkpoint-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        return cls(**{**values, "moe": MoEConfig(**values["moe"])})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration; ``overrides`` replace top-level fields."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"ModelConfig.preset: unknown preset {name!r}; choose from {sorted(MODEL_PRESETS)}")
        return MODEL_PRESETS[name]().replace(**overrides)


def _tiny() -> ModelConfig:
    moe = MoEConfig(hidden_size=128, moe_intermediate_size=64, n_routed_experts=16, n_shared_experts=1,
                    num_experts_per_tok=2, scoring_func="softmax", expert_balance_coef=1e-2)
    return ModelConfig(vocab_size=256, hidden_size=128, n_layers=4, n_heads=4, first_k_dense=1,
                       dense_intermediate_size=384, max_seq_len=128, tie_embeddings=True, moe=moe)


def _tiny_dense() -> ModelConfig:
    tiny = _tiny()
    return tiny.replace(first_k_dense=tiny.n_layers)


def _v2_lite_mini() -> ModelConfig:
    # V2-Lite: hidden 2048, dense FFN 10944, experts 1408 (2 shared + 64 routed, 6 active), 27 layers.
    moe = MoEConfig.preset("deepseek-v2-lite", hidden_size=256, moe_intermediate_size=176)
    return ModelConfig(vocab_size=256, hidden_size=256, n_layers=6, n_heads=4, first_k_dense=1,
                       dense_intermediate_size=1368, max_seq_len=256, tie_embeddings=False, moe=moe)


def _v3_mini() -> ModelConfig:
    # V3: hidden 7168, dense FFN 18432, experts 2048 (1 shared + 256 routed, 8 active), 61 layers, 3 dense.
    moe = MoEConfig.preset("deepseek-v3", hidden_size=256, moe_intermediate_size=72, n_routed_experts=64)
    return ModelConfig(vocab_size=256, hidden_size=256, n_layers=8, n_heads=4, first_k_dense=1,
                       dense_intermediate_size=656, max_seq_len=256, tie_embeddings=False, moe=moe)


MODEL_PRESETS = {"tiny": _tiny, "tiny-dense": _tiny_dense, "v2-lite-mini": _v2_lite_mini, "v3-mini": _v3_mini}

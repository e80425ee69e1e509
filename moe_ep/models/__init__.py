"""Decoder-only language models built from ``moe_ep.MoELayer``."""
from .config import MODEL_PRESETS, ModelConfig
from .transformer import MoETransformerLM

__all__ = ["MODEL_PRESETS", "ModelConfig", "MoETransformerLM"]

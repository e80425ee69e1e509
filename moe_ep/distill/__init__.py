"""Knowledge distillation between moe_ep language models and transformers causal LMs (docs/distillation.md)."""
from .adapters import TransformersCausalLM, lm_forward, load_lm
from .distiller import Distiller
from .losses import DistillationLoss, kd_loss, logits_mse_loss, map_layers, reverse_kd_loss

__all__ = ["DistillationLoss", "Distiller", "TransformersCausalLM", "kd_loss", "lm_forward", "load_lm",
           "logits_mse_loss", "map_layers", "reverse_kd_loss"]

"""Tiny transformers DeepSeek V2 / V3 causal LMs and a tiny tokenizer, built locally (nothing downloaded).

Both models have MLA attention, one dense and two MoE decoder layers, and
weights drawn from ``seed`` large enough that the experts, the router and the
V3 bias all shape the logits (transformers' own init, std 0.02, would leave
the MoE output near zero and every routing decision to the bias).
"""
import torch

MLA = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
           first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16,
           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=128)
# V2: group-limited (device-limited) routing, 2 shared experts, no renormalisation, scale 16.
V2 = dict(MLA, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, topk_method="group_limited_greedy",
          n_group=4, topk_group=2, routed_scaling_factor=16.0)
# V3: node-limited routing on top-2 group scores, sigmoid, bias, renormalised, scale 2.5.
V3 = dict(MLA, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
          norm_topk_prob=True, routed_scaling_factor=2.5)


def tiny_config(kind: str, vocab_size: int = 300, **extra):
    from transformers import DeepseekV2Config, DeepseekV3Config

    cls, fields = (DeepseekV3Config, V3) if kind == "v3" else (DeepseekV2Config, V2)
    return cls(**{**fields, "vocab_size": vocab_size, **extra})


def tiny_model(kind: str, seed: int = 0, **extra):
    """A ``DeepseekV{2,3}ForCausalLM`` in eval mode with reproducible random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **extra))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
            elif tensor.dim() >= 2:
                std = 0.5 if name.endswith("gate.weight") else 0.15
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 120):
    """A character-level BPE tokenizer trained on a few standard-library files, with <unk> and <eos>."""
    import sysconfig
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("abc.py", "bisect.py", "heapq.py")]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=80,
                                                              special_tokens=["<unk>", "<eos>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")

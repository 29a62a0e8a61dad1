"""Tiny random models of every decoder family the family matrix covers (tests/test_families.py).

Each is 4 layers, hidden 64, 4 query heads (2 KV heads where the family has GQA), head_dim 16, a 512-word
vocabulary. Families with sliding-window attention get a window of ``WINDOW`` tokens (memories in the matrix are
longer), and their mixed layer patterns (Gemma 2/3, Cohere 2, OLMo 3, EXAONE 4, gpt-oss, Qwen with
``max_window_layers``) keep both kinds of layer in 4 layers. Only the overrides a family needs are listed.
"""

from __future__ import annotations

import torch

WINDOW = 24
VOCAB = 512

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)

_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_SLIDING = dict(sliding_window=WINDOW)

# family -> config overrides (beyond BASE). A value of None removes a BASE key the family does not take.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": _SLIDING,
    "ministral": {**_SLIDING, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "mixtral": {**_SLIDING, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {**_SLIDING, "use_sliding_window": True, "max_window_layers": 2},
    "qwen3": {**_SLIDING, "use_sliding_window": True, "max_window_layers": 2},
    "qwen2_moe": {**_MOE, "shared_expert_intermediate_size": 32},
    "qwen3_moe": {**_MOE, **_SLIDING, "use_sliding_window": True},
    "gemma": {},
    "gemma2": {**_SLIDING},
    "gemma3_text": {**_SLIDING, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "phi": {},
    "phi3": {**_SLIDING},
    "olmo": {},
    "olmo2": {},
    "olmo3": {**_SLIDING, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "granite": {},
    "helium": {},
    "cohere": {},
    "cohere2": {**_SLIDING, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "starcoder2": {**_SLIDING},
    "stablelm": {},
    "gpt_neox": {},
    "falcon": {"head_dim": None, "num_key_value_heads": None},  # multi_query: one KV head (Falcon-7B style)
    "gpt_oss": {**_SLIDING, "num_local_experts": 4, "num_experts_per_tok": 2,
                "layer_types": ["sliding_attention", "full_attention"] * 2},
    "smollm3": {"no_rope_layers": [1, 1, 1, 0]},
    "exaone4": {**_SLIDING, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "glm": {},
    "glm4": {},
    "llama4_text": {"num_local_experts": 2, "num_experts_per_tok": 1, "intermediate_size_mlp": 128,
                    "attention_chunk_size": WINDOW, "no_rope_layers": [1, 1, 1, 0]},
    "ministral3": {**_SLIDING},
    "deepseek_v3": {"head_dim": None, "num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": None, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 16, "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 32, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1},
}


def family_config(family: str):
    from transformers import AutoConfig

    kwargs = {**BASE, **FAMILIES[family]}
    return AutoConfig.for_model(family, **{k: v for k, v in kwargs.items() if v is not None})


def family_model(family: str, *, attn: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A seeded random model of ``family`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = family_config(family)
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn).eval()

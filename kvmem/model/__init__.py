"""kvmem.model: what kvmem reads from and registers on a transformers model.

facts.py (base model, text config, dtype, devices, context length), devices.py (per-layer devices, read once
through accelerate's hooks), cache.py (glue to transformers' Cache objects), static_cache.py (the static prefix
cache), attention.py (GQA sdpa without repeat_kv, through transformers' attention registry), rope.py (RoPE and
attention facts per layer, read and measured from the model).
"""

"""kvmem.model: what kvmem reads from and registers on a transformers model.

facts.py (base model, text config, context length), devices.py (dtype and device, per-layer devices, offloaded
weights: the one reader of accelerate's hooks), watch.py (whether a model changed, in one pass over references),
resolve.py (ModelFacts: all of it resolved once per model generation), cache.py (glue to transformers' Cache objects), static_cache.py (the static prefix
cache), attention.py (GQA sdpa without repeat_kv, through transformers' attention registry), rope.py (RoPE and
attention facts per layer, read and measured from the model).
"""

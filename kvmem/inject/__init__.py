"""kvmem.inject: memory into a running model.

prefill.py (cubes -> a fresh transformers Cache: layout, the one composer, re-rotation), recompute.py (recovering
the cross-attention that separately built cubes miss), batch.py (B requests with their own cubes in one batch),
adapters.py (AdapterCubes hot-swapped on a live model through PEFT).
"""

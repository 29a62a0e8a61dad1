"""Memory that changes kind with use: plaintext -> activation cube -> parametric adapter, and back down.

- `distill` (distill.py): learn memories into a LoRA AdapterCube by context distillation (questions.py makes the
  questions, checkpoint.py the resumable checkpoints);
- `EvolvePolicy` (policy.py): the off-by-default policy that distils a namespace's hot, stable memories into an
  adapter, keeps cubes for what is new or changing, and demotes what goes cold.
"""

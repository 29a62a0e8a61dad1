"""The learning-rate schedules of distillation (kvmem/evolve/distill.py): the multiple of the peak lr at each
point of a run."""

from __future__ import annotations

# "wsd" decays over this last share of the run
WSD_DECAY = 0.2


def lr_factor(progress: float, *, schedule: str, warmup: float) -> float:
    """The learning rate's multiple of its peak at ``progress`` (0 -> 1, the share of the run done): a linear
    warm-up over ``warmup``, then a cosine decay to 0.1 ("cosine"), or the peak until the last `WSD_DECAY` of the
    run (or the warm-up's end, if later) and a linear decay to 0.1 over the rest ("wsd": warm-up, stable, decay);
    1 throughout ("constant")."""
    import math

    if schedule == "constant":
        return 1.0
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return (progress + 1e-3) / warmup
    if schedule == "wsd":  # a warm-up longer than the stable part: the decay starts where the warm-up ends
        start = max(1 - WSD_DECAY, warmup)
        return 1.0 - 0.9 * max(0.0, progress - start) / (1 - start)
    done = (progress - warmup) / (1 - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

"""How the memory index turns several score lists into one ranking (pure functions; the benches call them too).

Each component is a tensor of scores [..., memories] (one row per query, or one query). Two fusions:

    rrf:    fused = sum_c  w_c / (rrf_k + rank_c)              rank_c: 1 = the best memory under component c
    zscore: fused = sum_c  w_c * (s_c - mean(s_c)) / std(s_c)  over the memories, per query

A *boost* component (the date match, the speaker match) holds evidence in [0, 1] that most memories lack: it adds
``w * value / (rrf_k + 1)`` under rrf (as if ranked first, scaled by its value) and ``w * value`` under zscore,
and nothing where its value is 0.
"""

from __future__ import annotations

import torch

from ..errors import CubeError

FUSIONS = ("rrf", "zscore")


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """[..., n] 1-based rank of each memory: 1 + how many memories score higher (equal scores share a rank, so
    identical texts rank alike)."""
    values, order = scores.sort(dim=-1, descending=True)
    n = scores.shape[-1]
    at = torch.arange(n, device=scores.device).expand_as(order)
    new = torch.ones_like(order, dtype=torch.bool)
    new[..., 1:] = values[..., 1:] != values[..., :-1]
    first = torch.where(new, at, torch.zeros_like(at)).cummax(dim=-1).values  # where each run of ties starts
    return torch.empty_like(order).scatter_(-1, order, first + 1)


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std over the last dim; a constant row (nothing matched) gives zeros."""
    mean = scores.mean(dim=-1, keepdim=True)
    return (scores - mean) / scores.std(dim=-1, correction=0, keepdim=True).clamp_min(1e-9)


def fuse(components: dict[str, torch.Tensor], weights: dict[str, float], *, fusion: str = "rrf",
         rrf_k: float = 60.0, boosts=("date", "speaker")) -> torch.Tensor:
    """One score per memory from the weighted ``components`` (names missing from ``components`` are skipped).

    Args:
        components: name -> [..., n] scores, all the same shape.
        weights: name -> weight; a weight of 0 leaves the component out.
        fusion: "rrf" (reciprocal-rank fusion) or "zscore" (z-scored scores mixed by weight).
        rrf_k: the rank offset of rrf (higher: flatter).
        boosts: names whose values are evidence in [0, 1] added as a boost (see the module doc).

    Returns:
        [..., n] fused scores, higher is better.
    """
    if fusion not in FUSIONS:
        raise CubeError(f"fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
    used = [(name, float(w)) for name, w in weights.items() if w and name in components]
    if not used:
        raise CubeError(f"no component to fuse: weights {weights} name none of {sorted(components)}")
    fused = None
    for name, w in used:
        s = components[name].float()
        if name in boosts:
            part = w * s / (rrf_k + 1) if fusion == "rrf" else w * s
        elif fusion == "rrf":
            part = w / (rrf_k + ranks(s).float())
        else:
            part = w * zscore(s)
        fused = part if fused is None else fused + part
    return fused

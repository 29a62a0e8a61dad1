"""Computing a cube's KV: a model's prefill of token ids, in chunks, read out of transformers' cache."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import CubeError
from ..model.cache import cache_kwarg, kv_from_cache, output_cache
from ..model.devices import model_device
from ..model.facts import eval_mode


def _as_ids(ids, what: str) -> torch.Tensor:
    """``ids`` (list, 1-D or [1, n] tensor) as a 1-D int64 CPU tensor; CubeError for anything else."""
    if ids is None:
        return torch.zeros(0, dtype=torch.long)
    if isinstance(ids, torch.Tensor):
        t = ids.detach()
    else:
        try:
            t = torch.as_tensor(list(ids))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CubeError(f"{what} must be token ids (a list of ints or a LongTensor), got {type(ids).__name__}: {exc}") from None
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise CubeError(f"{what} must be 1-D or shaped [1, n] (one sequence), got shape {tuple(t.shape)}")
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise CubeError(f"{what} must hold integer token ids, got dtype {t.dtype}")
    return t.to(device="cpu", dtype=torch.long)


def compute_kv(model, ids: torch.Tensor, *, chunk_size: int = 2048, progress: bool | None = None
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefill ``ids`` (1-D) through ``model`` and return per layer (keys, values) [kv_heads, n, head_dim].

    Long inputs go through in chunks of ``chunk_size`` tokens (bounded memory, a progress bar); the KV equals a
    one-pass prefill up to float rounding.
    """
    from transformers import DynamicCache

    device = model_device(model)
    ids = ids.to(device)[None]
    n = ids.shape[1]
    cache = DynamicCache()  # no config: every layer keeps all tokens, sliding-window layers included
    kw = cache_kwarg(model)
    show = progress if progress is not None else n > chunk_size
    with torch.inference_mode(), eval_mode(model), tqdm(total=n, unit="tok", desc="kvmem: prefill",
                                                         disable=not show, leave=bool(progress)) as bar:
        for start in range(0, n, chunk_size):
            chunk = ids[:, start:start + chunk_size]
            out = model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{kw: cache})
            cache = output_cache(out)
            bar.update(chunk.shape[1])
    return [(k[0].contiguous(), v[0].contiguous()) for k, v in kv_from_cache(cache)]

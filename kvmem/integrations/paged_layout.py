"""Where a paged KV cache keeps each key and value of a block (`PagedLayout`), learned through the attention
backend's own write op, and reading a request's keys and values back out of it (the server's cube saves).

vLLM writes a layer's KV through its backend's own op (``layer.impl.do_kv_cache_update``), and the CPU backend
packs rows for the CPU's instruction set (AMX / VNNI pair dimensions), so indexing a block by hand reads the wrong
numbers. `PagedLayout.learn` asks the op itself: it writes numbered keys and values into one scratch block and
records where each number landed. That map (one gather index per block) then reads any block back exactly, for
any backend whose op is a pure placement (no scaling: fp8 caches are refused); `PagedLayout.forms` says where
it is plain rows or columns per head (`kvmem.integrations.vllm_pages.BlockPlacement` writes those by plain copies).
"""

from __future__ import annotations

import torch

from ..errors import CubeError

_BASE = 128  # a number's digits in this base are exact in every float dtype a KV cache uses (bf16: up to 256)


class PagedLayout:
    """Where token t, head h, dim d of a block's keys (and values) sit in one block of the paged cache.

    Attributes:
        block_size, num_heads, head_size: the block's shape as the write op takes it ([block_size, H, D] rows).
    """

    def __init__(self, key_index: torch.Tensor, value_index: torch.Tensor, block_size: int, num_heads: int,
                 head_size: int):
        self.key_index, self.value_index = key_index, value_index  # [block_size * H * D] flat positions in a block
        self.block_size, self.num_heads, self.head_size = block_size, num_heads, head_size

    @classmethod
    def learn(cls, layer, kv_cache: torch.Tensor, *, block_size: int) -> "PagedLayout":
        """The layout of ``layer``'s cache ``kv_cache`` ([num_blocks, ...], blocks on dim 0), learned through the
        layer's own ``impl.do_kv_cache_update`` on a scratch block (the real cache is not touched).

        Raises:
            CubeError: the op is not a one-to-one placement (a quantized cache), or the layer lacks the op.
        """
        impl = getattr(layer, "impl", None)
        if not hasattr(impl, "do_kv_cache_update"):
            raise CubeError(f"attention layer {type(layer).__name__} has no do_kv_cache_update to learn its layout")
        if getattr(impl, "kv_cache_dtype", "auto") not in ("auto", None):
            raise CubeError(f"the KV cache is stored as {impl.kv_cache_dtype}: kvmem saves full-precision caches only")
        heads, head_size = int(layer.num_kv_heads), int(layer.head_size)
        n = block_size * heads * head_size
        scratch = torch.zeros((1, *kv_cache.shape[1:]), dtype=kv_cache.dtype, device=kv_cache.device)
        if scratch.numel() < 2 * n:
            raise CubeError(f"a cache block holds {scratch.numel()} numbers, fewer than its keys and values ({2 * n})")
        slots = torch.arange(block_size, dtype=torch.long, device=kv_cache.device)
        numbers = torch.arange(1, n + 1, dtype=torch.long)  # 0 marks a position nothing was written to
        passes = 1
        while _BASE ** passes <= n:
            passes += 1
        index = []
        for which in (0, 1):  # keys, then values
            code = torch.zeros(scratch.numel(), dtype=torch.long)
            for p in range(passes):
                digit = (numbers // _BASE ** p % _BASE).to(kv_cache.dtype).view(block_size, heads, head_size)
                zero = torch.zeros_like(digit)
                scratch.zero_()
                k, v = (digit, zero) if which == 0 else (zero, digit)
                impl.do_kv_cache_update(layer, k.to(kv_cache.device), v.to(kv_cache.device), scratch, slots)
                code += scratch.reshape(-1).to("cpu", torch.float64).round().to(torch.long) * _BASE ** p
            where = torch.nonzero(code).flatten()
            if where.numel() != n or not torch.equal(torch.sort(code[where]).values, numbers):
                raise CubeError("the KV cache write op is not a one-to-one placement of keys and values (a quantized "
                                "or scaled cache): kvmem cannot read it back exactly")
            flat = torch.empty(n, dtype=torch.long)
            flat[code[where] - 1] = where
            index.append(flat.to(kv_cache.device))
        return cls(index[0], index[1], block_size, heads, head_size)

    def forms(self) -> tuple[tuple[str, list[int]] | None, tuple[str, list[int]] | None]:
        """How keys and values sit in a block, each ``("rows", offsets)`` (head h's [block_size, D] rows, in token
        order, from flat position ``offsets[h]`` of the block), ``("cols", offsets)`` (head h's [D, block_size],
        transposed) or None (any other placement). vLLM's CPU backend stores float32 values as rows and keys as
        columns; a part in rows can be read from a cube file straight into its blocks (`BlockPlacement`)."""
        t = torch.arange(self.block_size).view(-1, 1, 1)
        d = torch.arange(self.head_size).view(1, 1, -1)
        out = []
        for index in (self.key_index, self.value_index):
            index = index.to("cpu").view(self.block_size, self.num_heads, self.head_size)
            base = index[0, :, 0].view(1, -1, 1)
            form = None
            for name, expect in (("rows", base + t * self.head_size + d), ("cols", base + d * self.block_size + t)):
                if torch.equal(index, expect):
                    form = (name, [int(b) for b in base.flatten()])
            out.append(form)
        return out[0], out[1]

    def read(self, kv_cache: torch.Tensor, block_ids, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each [H, num_tokens, D] on the CPU, of the first ``num_tokens`` tokens held in blocks
        ``block_ids`` (in order) of ``kv_cache``. A copy: the blocks may be reused once this returns."""
        need = -(-num_tokens // self.block_size)
        if len(block_ids) < need:
            raise CubeError(f"{num_tokens} tokens need {need} blocks, the request holds {len(block_ids)}")
        ids = torch.as_tensor(list(block_ids[:need]), dtype=torch.long, device=kv_cache.device)
        blocks = kv_cache.index_select(0, ids).reshape(need, -1)
        shape = (need * self.block_size, self.num_heads, self.head_size)
        keys = blocks[:, self.key_index].reshape(shape)[:num_tokens]
        values = blocks[:, self.value_index].reshape(shape)[:num_tokens]
        return keys.transpose(0, 1).to("cpu").contiguous(), values.transpose(0, 1).to("cpu").contiguous()

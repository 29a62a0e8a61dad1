"""Cube KV written into vLLM's real CPU paged cache by plain copies (`kvmem.integrations.vllm_pages.BlockPlacement`)
holds exactly the bytes vLLM's own write op (``do_kv_cache_update``) puts there: float32 (keys as columns, values
as rows: values read from the cube file straight into the blocks) and bfloat16 (whatever the CPU's instruction set
packs: plain copies where the placement allows, else the op). No engine: the backend's attention impl alone."""

from __future__ import annotations

import pytest
import torch

# vllm.config, not vllm: without vLLM, this very folder would import as an empty namespace package "vllm"
pytest.importorskip("vllm.config", reason="vLLM is not installed here (it runs in .venv-vllm; see .ci/run)")
pytestmark = pytest.mark.vllm

import kvmem  # noqa: E402
from helpers import random_ids, tiny_model  # noqa: E402
from kvmem.cubes.cubefile import CubeFile  # noqa: E402
from kvmem.integrations.key_blocks import open_key_blocks, write_key_blocks  # noqa: E402
from kvmem.integrations.sources import FileKV  # noqa: E402
from kvmem.integrations.vllm_pages import BlockPlacement, LayerWriter, Load  # noqa: E402

BLOCK, HEADS, DIM = 128, 3, 64  # SmolLM2-135M's cache: 3 KV heads of 64


_CUBE = []


def random_cube():
    """A 300-token cube of a random 2-layer model with SmolLM2's KV shape (3 heads of 64), built once."""
    if not _CUBE:
        model = tiny_model("llama", hidden_size=192, num_attention_heads=3, num_key_value_heads=HEADS, head_dim=DIM)
        _CUBE.append(kvmem.MemCube.from_ids(model, random_ids(300), name="r"))
    return _CUBE[0]


class CpuLayer:
    """What the connector reads off a vLLM attention layer: its impl (vLLM's CPU backend), isa and cache."""

    def __init__(self, dtype, blocks=6):
        from vllm.v1.attention.backend import AttentionType
        from vllm.v1.attention.backends import cpu_attn

        # vLLM's own impl class and its own do_kv_cache_update; built without __init__, which wants a whole
        # engine config, of which the write op uses nothing but these two attributes
        self.impl = object.__new__(cpu_attn.CPUAttentionBackendImpl)
        self.impl.attn_type, self.impl.kv_cache_dtype = AttentionType.DECODER, "auto"
        self.isa = cpu_attn._get_attn_isa(dtype, BLOCK, DIM, "auto")  # the engine's choice for this cache
        self.num_kv_heads, self.head_size = HEADS, DIM
        self._k_scale_float = self._v_scale_float = 1.0
        self.kv_cache = torch.zeros(blocks, HEADS, BLOCK, 2 * DIM, dtype=dtype)  # vLLM CPU: [blocks, H, size, 2D]


@pytest.mark.parametrize("key_blocks", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window, first", [((0, 300), 0), ((128, 300), 0), ((10, 300), 40)])
def test_plain_copies_equal_vllm_cpu_op(tmp_path, dtype, window, first, key_blocks, monkeypatch):
    """With the cube's key-blocks sidecar (``key_blocks``) keys are read from it straight into the blocks where the
    window sits on the block grid and the cache keeps keys as columns (float32 here): the same bytes as the op."""
    cube = random_cube().to(dtype)
    kv = cube.kv
    cube.save(tmp_path / "r.safetensors")
    f = CubeFile.open(tmp_path / "r.safetensors")
    blocks_file = None
    if key_blocks:
        write_key_blocks(tmp_path / "r.safetensors", block_size=BLOCK)
        blocks_file = open_key_blocks(f, BLOCK)
        assert blocks_file is not None
    used = []
    real = BlockPlacement.read_key_blocks
    monkeypatch.setattr(BlockPlacement, "read_key_blocks", lambda self, *a, **k: (used.append(a[1]), real(self, *a, **k)))
    lo, hi = window
    n = hi - lo
    blocks = [4, 0, 5, 2][:-(-(first + n) // BLOCK)]
    slots = torch.tensor([blocks[(first + p) // BLOCK] * BLOCK + (first + p) % BLOCK for p in range(n)])
    layers = [(i, f"model.layers.{i}.self_attn.attn", CpuLayer(dtype)) for i in range(2)]
    writer = LayerWriter(block_size=BLOCK)
    writer.start([Load("r", FileKV(f, 0, 300, key_blocks=blocks_file).window(lo, hi), slots, blocks)], layers)
    assert writer.finish() == set()
    for i, _, layer in layers:
        want = CpuLayer(dtype)
        want.impl.do_kv_cache_update(want, kv[i][0][:, lo:hi].transpose(0, 1).contiguous(),
                                     kv[i][1][:, lo:hi].transpose(0, 1).contiguous(), want.kv_cache, slots)
        assert torch.equal(layer.kv_cache.view(torch.uint8), want.kv_cache.view(torch.uint8))
    placement = writer.placement(layers[0][2])
    if dtype == torch.float32:  # the layout this machine's float32 cache has, which the fast path relies on
        assert placement is not None and [form for form, _ in placement.forms] == ["cols", "rows"]
        assert used == (["kb.0", "kb.1"] if key_blocks and lo % BLOCK == first else [])
    writer.close()

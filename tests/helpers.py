"""Plain helpers shared by the tests: tiny random models, cube-file surgery, fakes, and shared test data.

Fixtures live in ``conftest.py``; everything here is an ordinary function, class or constant, imported as
``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``). kvmem is imported inside the functions that
use it, so a broken kvmem import fails only the test modules that need it, not collection as a whole.

A cube file is a safetensors file: an 8-byte little-endian header length, the header JSON (tensor entries and
``__metadata__`` with format, format_version, meta, checksum), then the tensor bytes. The file-surgery helpers take
it apart and put it back together so a test can damage exactly one thing.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

FORMAT = "kvmem.memcube"
ANCHOR_LEN, NUM_TOKENS = 3, 13  # 16 KV entries; 13 is not a power of two


# ---------------------------------------------------------------------------------------------- tiny models
def tiny_config(family: str, **overrides):
    """A small config of ``family``: 2 layers, GQA, head_dim 16, the SmolLM2 vocabulary size."""
    from transformers import AutoConfig

    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=2048,
                  tie_word_embeddings=False)
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", *, dtype=torch.float32, seed: int = 0, attn: str = "sdpa", **overrides):
    """A randomly initialised causal LM of ``family`` (deterministic for a seed), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def random_ids(n: int, *, seed: int = 0, vocab: int = 49152) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n,), generator=g)


# ---------------------------------------------------------------------------------------------- exactness
def logit_tol(dtype: torch.dtype, scale: float) -> float:
    # Two prefill schedules sum the same products in another order: a few ulps of the logit scale per layer.
    return 64 * torch.finfo(dtype).eps * max(1.0, scale)


def last_logits(model, ids, **kw):
    """Float32 logits of the last position of a forward pass over ``ids`` ([1, n])."""
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits[0, -1].float()


def greedy(model, ids, n=8, **kw):
    """``n`` greedily decoded tokens after ``ids`` (prompt included), as ``model.generate`` returns them."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, **kw)


# ---------------------------------------------------------------------------------------------- file surgery
def split_file(data: bytes) -> tuple[dict, bytes]:
    """(header JSON as a dict, tensor payload) of a safetensors file's bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def join_file(header: dict, payload: bytes) -> bytes:
    """Bytes of a safetensors file with this header and payload (header padded with spaces to 8 bytes)."""
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + payload


def with_header_meta(data: bytes, **changes) -> bytes:
    """The file with some ``__metadata__`` strings replaced and everything else (the checksum too) as it was."""
    header, payload = split_file(data)
    header["__metadata__"].update(changes)
    return join_file(header, payload)


def with_meta_edit(data: bytes, edit) -> bytes:
    """The file with ``edit(meta)`` applied to the cube metadata, keeping the stored checksum (now stale)."""
    header, payload = split_file(data)
    meta = json.loads(header["__metadata__"]["meta"])
    edit(meta)
    header["__metadata__"]["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    return join_file(header, payload)


def read_parts(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a cube file, read with plain safetensors (no kvmem validation)."""
    header, _ = split_file(path.read_bytes())
    return json.loads(header["__metadata__"]["meta"]), load_file(str(path))


def forge(path: Path, meta: dict, tensors: dict[str, torch.Tensor], *, fmt: str = FORMAT) -> Path:
    """Write a cube file whose checksum matches its (possibly inconsistent) contents: only validation can object."""
    from kvmem.cubes.format import checksum

    meta_json = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    save_file(tensors, str(path), metadata={"format": fmt, "format_version": "1", "meta": meta_json,
                                            "checksum": checksum(fmt, "1", meta_json, tensors)})
    return path


def write(tmp_path: Path, data: bytes, name: str = "cube.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------- cube checks
def assert_same_cube(a, b) -> None:
    """Ids, metadata and every KV tensor of two MemCubes equal bit for bit (compared as raw bytes, so NaNs and
    -0.0 count)."""
    assert torch.equal(a.all_ids, b.all_ids)
    assert a.anchor_len == b.anchor_len and a.num_tokens == b.num_tokens
    assert a.meta == b.meta
    assert len(a.kv) == len(b.kv)
    for (ka, va), (kb, vb) in zip(a.kv, b.kv):
        for x, y in ((ka, kb), (va, vb)):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def same_cube(a, b) -> bool:
    try:
        assert_same_cube(a, b)
    except AssertionError:
        return False
    return True


def load_or_usable(path: Path, model) -> str:
    """Load ``path``: either CubeError, or a cube whose every view works and which prefill takes or refuses with
    CubeError. Any other exception propagates (that is the bug a test reports). Returns what happened."""
    import kvmem
    from kvmem import CubeError, MemCube

    try:
        cube = MemCube.load(path)
    except CubeError:
        return "refused at load"
    repr(cube), cube.name, cube.fingerprint, cube.input_ids, cube.anchor_ids, cube.meta  # noqa: B018
    try:
        prefix = kvmem.prefill(model, cube)
    except CubeError:
        return "refused at prefill"
    # accepted: then the cache must fit the model
    config = model.config
    fits = (config.num_key_value_heads, prefix.num_tokens, config.head_dim)
    layers = len(cube.kv)
    want = config.num_hidden_layers
    assert layers == want, f"prefill accepted {layers} KV layers for a {want}-layer model"
    for k, v in cube.kv:
        shape_k, shape_v = tuple(k.shape), tuple(v.shape)
        assert shape_k == shape_v == fits, f"prefill accepted KV {shape_k}/{shape_v}, the model needs {fits}"
    low, high = int(prefix.input_ids.min()), int(prefix.input_ids.max())
    ok = 0 <= low and high < config.vocab_size
    assert ok, f"prefill accepted token ids in [{low}, {high}], outside the model's vocabulary [0, {config.vocab_size})"
    return "accepted"


# ---------------------------------------------------------------------------------------------- scheduler fakes
class FakeCube:
    def __init__(self, nbytes, device="cpu"):
        self.nbytes, self.device = nbytes, device

    def to(self, device):
        return FakeCube(self.nbytes, str(device))


class FakeView:
    def __init__(self, sizes):
        self.sizes, self.loads = sizes, 0

    def load_cube(self, memory_id, device=None):
        if memory_id not in self.sizes:
            return None
        self.loads += 1
        return FakeCube(self.sizes[memory_id])


# ---------------------------------------------------------------------------------------------- retrieval data
CONVERSATION = [
    ("s1", "I finally adopted a beagle puppy last weekend, we named him Toast."),
    ("s2", "Work has been hectic; I switched teams and now build data pipelines."),
    ("s3", "We moved out of Lisbon. The new flat in Oslo has a view of the fjord."),
    ("s4", "My sister Lena is getting married in June in Porto."),
    ("s5", "I started learning the cello, lessons are on Tuesday evenings."),
    ("s6", "Doctor said my knee is fine, just no marathons this year."),
    ("s7", "The quarterly report is due on the 14th, my manager reminded me."),
    ("s8", "Dinner idea: mushroom risotto again, it is my favourite dish."),
]
QUESTIONS = [("What is my dog called?", "s1"), ("Which city do I live in now?", "s3"),
             ("When is my sister's wedding?", "s4"), ("What instrument am I learning?", "s5"),
             ("What do I do at work these days?", "s2"), ("What food do I like most?", "s8")]

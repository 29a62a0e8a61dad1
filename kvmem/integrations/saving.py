"""Cubes built by the serving engine: a request asks for its prompt's KV to be kept as a normal MemCube.

Engine-agnostic (imports no engine): `kvmem.integrations.vllm` copies the KV out of vLLM's paged cache and calls
`build_cube` and `write_cube` on a background thread.

A request asks in ``kv_transfer_params["kvmem"]`` (`parse_save`)::

    {"save": "notes", "namespace": "alice", "text": "...", "tokens": 300, "anchor": 12}

- ``save``: the cube's name (the store's name rule); ``namespace``: one of the served ones (default: the server's).
- ``tokens``: how many leading prompt tokens the cube holds (default: the whole prompt); ``anchor``: how many of
  those are the anchor the memory continues (a chat template's system header; default 0).
- ``text``: the memory's source text; when given it must tokenize to exactly the memory's ids (after the anchor),
  so a cube never claims a text it was not computed from.

The cube records the served checkpoint's fingerprint (the one every served cube is checked against), the token
ids and the text; it is validated (read back through `MemCube.load`) before anything else can see it, and written
atomically: a file in the folder source, or ``put_cube`` into the store (a Redis store: every replica serves it at
its next request).
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import xxhash

from ..cubes.memcube import MemCube, cube_meta
from ..errors import CubeError
from ..store.records import check_name
from .key_blocks import key_blocks_path, store_key_blocks, write_key_blocks
from .key_blocks import logger as key_blocks_logger
from .tenancy import request_namespace


@dataclass(frozen=True)
class SaveSpec:
    """What one request asked to keep: cube ``name`` in ``namespace``, the first ``len(ids)`` prompt tokens, of
    which the first ``anchor`` are the anchor; ``text`` the memory's source text (None: not given);
    ``record_text`` the text a store's memory record gets (``text``, else the memory's ids decoded)."""

    name: str
    namespace: str
    ids: tuple[int, ...]
    anchor: int
    text: str | None
    record_text: str | None = None
    auto: bool = False  # saved by `AutoSave`, not asked for: counted against its byte capacity

    @property
    def tokens(self) -> int:
        return len(self.ids)


def _count(value, what: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CubeError(f'kv_transfer_params["kvmem"]["{what}"] must be an int in [{low}, {high}] for this prompt, '
                        f"got {value!r:.40}")
    return value


def parse_save(spec, prompt_ids: Sequence[int], *, default: str, served: Sequence[str], tokenizer=None
               ) -> SaveSpec | None:
    """The save a request asks for (see the module docstring), checked; None when it asks for none.

    Args:
        spec: the request's ``kv_transfer_params["kvmem"]`` (or None).
        prompt_ids: the request's prompt token ids.
        default, served: the server's default namespace and the namespaces it serves.
        tokenizer: the served tokenizer, to check ``text`` against the ids (a text is refused without one).

    Raises:
        CubeError: why the save cannot be done (the request itself is still served).
    """
    if not isinstance(spec, dict) or spec.get("save") is None:
        return None
    name = check_name(spec["save"], 'kv_transfer_params["kvmem"]["save"] (the cube name)')
    namespace = request_namespace(spec, default=default, served=served)
    prompt = [int(t) for t in prompt_ids]
    tokens = _count(spec.get("tokens", len(prompt)), "tokens", low=1, high=len(prompt))
    anchor = _count(spec.get("anchor", 0), "anchor", low=0, high=tokens - 1)
    ids = tuple(prompt[:tokens])
    text = spec.get("text")
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            raise CubeError(f'kv_transfer_params["kvmem"]["text"] must be a non-empty string, got {text!r:.40}')
        if tokenizer is None:
            raise CubeError("this server cannot check a saved cube's text (no tokenizer): omit text")
        text_ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
        if text_ids != ids[anchor:]:
            raise CubeError(f"the text tokenizes to {len(text_ids)} ids that are not the memory's {tokens - anchor} "
                            f"prompt ids after the {anchor}-token anchor: send the text's own ids as the prompt "
                            "(anchor ids + tokenizer(text) ids + the question) and tokens = anchor + len(text ids)")
    record_text = text
    if record_text is None and tokenizer is not None:
        record_text = tokenizer.decode(list(ids[anchor:]))
    return SaveSpec(name, namespace, ids, anchor, text, record_text if record_text and record_text.strip() else None)


def build_cube(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], spec: SaveSpec, *, fields: dict,
               engine: str) -> MemCube:
    """The MemCube of ``spec``'s tokens from the engine's KV: per layer (keys, values) [kv_heads, tokens, head_dim],
    post-RoPE, the layout `MemCube.from_ids` builds; ``fields``: the served checkpoint's fingerprint fields;
    ``engine``: recorded in the metadata (e.g. "vllm 0.32.0")."""
    kv = [(k.detach().to("cpu").contiguous(), v.detach().to("cpu").contiguous()) for k, v in kv]
    shapes = {(k.shape[1], v.shape[1]) for k, v in kv}
    if not kv or shapes != {(spec.tokens, spec.tokens)}:
        raise CubeError(f"the engine's KV covers {sorted(shapes)} tokens per layer, not the {spec.tokens} to save")
    meta = cube_meta(kv, fields, name=spec.name, text=spec.text, anchor=None, anchor_len=spec.anchor,
                     num_tokens=spec.tokens - spec.anchor, built_by=engine)
    return MemCube(kv, torch.tensor(spec.ids, dtype=torch.long), meta)


class Written(str):
    """Where `write_cube` put a cube (the string), and ``key_blocks_bytes``: the bytes of the key blocks written
    with it (0 where none were), which count against an autosave capacity as the cube's own bytes do."""

    key_blocks_bytes: int = 0

    @classmethod
    def at(cls, where: str, key_blocks_bytes: int = 0) -> "Written":
        out = cls(where)
        out.key_blocks_bytes = key_blocks_bytes
        return out


def write_cube(source, spec: SaveSpec, cube: MemCube, *, key_block_size: int | None = None) -> Written:
    """Validate ``cube`` (written, then read back through `MemCube.load`) and publish it atomically in ``source``
    (a `kvmem.integrations.serving.CubeSource`): ``<folder>/<namespace>/<name>.safetensors``, or ``put_cube``
    into the store with ``spec.record_text`` (a store memory needs a text). Returns where it went (a `Written`).

    ``key_block_size``: the cube also gets its keys in the engine's block layout for blocks of that many tokens
    (`kvmem.integrations.key_blocks`): a folder cube's are written before the cube is published, so a server never
    sees the cube without them; a store cube's right after it is put (`store_key_blocks`: beside its blob, or in
    Redis)."""
    if source.folder is not None:
        final = Path(source.folder) / spec.namespace / f"{spec.name}.safetensors"
        final.parent.mkdir(parents=True, exist_ok=True)
        # a hidden staging name: the folder source only lists names that pass the name rule (no leading dot)
        fd, staged = tempfile.mkstemp(dir=final.parent, prefix=f".{spec.name}.", suffix=".safetensors")
        os.close(fd)
        side = 0
        try:
            cube.save(staged)
            MemCube.load(staged)  # validated before any reader can see it
            if key_block_size:
                side = _write_key_blocks(staged, final, key_block_size)
            os.replace(staged, final)
        finally:
            if os.path.exists(staged):
                os.unlink(staged)
        return Written.at(str(final), side)
    with tempfile.TemporaryDirectory(prefix="kvmem-save-") as tmp:
        path = Path(tmp) / f"{spec.name}.safetensors"
        cube.save(path)
        checked = MemCube.load(path)
        rec = source.store.view(spec.namespace).put_cube(spec.name, checked, text=spec.record_text)
        side = 0
        if key_block_size and rec.blob is not None:  # after the cube: a load in between copies its keys
            try:
                side = store_key_blocks(source.store, rec.blob, block_size=key_block_size, staging=tmp)[1]
            except Exception as exc:  # the cube is saved already: key blocks only speed its loads up
                key_blocks_logger.warning("kvmem: key blocks for %s/%s not written (%s: %s); the cube is saved "
                                          "without them, its keys are copied into the blocks when it loads",
                                          spec.namespace, spec.name, type(exc).__name__, exc)
    return Written.at(f"{source.location} {spec.namespace}/{rec.id}", side)


def _write_key_blocks(staged: str, final: Path, block_size: int) -> int:
    """The cube's key blocks beside ``final``; they only speed up loads, so a failure to write them (a full disk, an
    I/O error) is logged and the cube is published without them (its keys are then copied into the blocks).
    Returns the bytes written (0: none)."""
    side = key_blocks_path(final, block_size)
    try:
        return write_key_blocks(staged, block_size=block_size, out=side).stat().st_size
    except (OSError, ValueError) as exc:
        side.unlink(missing_ok=True)
        key_blocks_logger.warning("kvmem: key blocks for %s not written (%s); the cube is saved without them, its "
                                  "keys are copied into the blocks when it loads", final, exc)
        return 0


def delete_cube(source, namespace: str, name: str) -> None:
    """Remove cube ``name`` of ``namespace`` from ``source`` (a missing one is not an error)."""
    if source.folder is not None:
        path = Path(source.folder) / namespace / f"{name}.safetensors"
        path.unlink(missing_ok=True)
        # its key blocks (key_blocks_path: "<name>.keys-b<N>"), and nothing else: "a.keys-b*" would also match
        # another cube named "a.keys-b16" (names may hold dots and dashes) and that cube's own sidecar
        own = re.compile(rf"{re.escape(name)}\.keys-b\d+")
        for side in path.parent.glob(f"{glob.escape(name)}.keys-b*"):
            if own.fullmatch(side.name):
                side.unlink(missing_ok=True)
    else:
        source.store.view(namespace).rm(name)


class AutoSave:
    """Keep the KV of every prompt of at least ``tokens`` tokens as a cube, within ``capacity`` bytes (off unless
    configured: ``autosave_tokens`` / ``autosave_bytes``). A prompt's whole KV blocks become cube
    ``auto-<hash of their ids>`` in the request's namespace, served later to prompts that start with them
    (automatic matching); when the cubes saved this way exceed ``capacity``, the oldest are deleted.

    The capacity counts the cubes this server process saved; cubes saved before a restart are not counted
    (delete them with ``kvmem rm`` or from the folder).
    """

    def __init__(self, *, tokens, capacity, block_size: int):
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < block_size:
            raise CubeError(f"autosave_tokens must be an int >= the KV block size ({block_size}), got {tokens!r:.40}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise CubeError("autosave_bytes must be a positive int (the bytes auto-saved cubes may hold, e.g. "
                            f"4000000000), got {capacity!r:.40}")
        self.tokens, self.capacity, self.block_size = tokens, capacity, block_size
        self._kept: OrderedDict[tuple[str, str], int] = OrderedDict()  # (namespace, name) -> bytes, oldest first
        self._lock = threading.Lock()

    def spec(self, prompt_ids: Sequence[int], namespace: str, *, tokenizer=None, exists=None) -> SaveSpec | None:
        """The save for a prompt (None: too short, or its cube exists: ``exists(namespace, name)``)."""
        if len(prompt_ids) < self.tokens:
            return None
        n = len(prompt_ids) // self.block_size * self.block_size
        ids = [int(t) for t in prompt_ids[:n]]
        name = "auto-" + xxhash.xxh3_64(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()
        if exists is not None and exists(namespace, name):
            return None
        spec = parse_save({"save": name, "tokens": n, "namespace": namespace}, ids, default=namespace,
                          served=[namespace], tokenizer=tokenizer)
        return replace(spec, auto=True)

    def admit(self, source, spec: SaveSpec, nbytes: int) -> list[str]:
        """Count a saved cube; delete the oldest auto-saved cubes while over capacity. Returns the deleted ones."""
        evicted = []
        with self._lock:
            self._kept[(spec.namespace, spec.name)] = nbytes
            while sum(self._kept.values()) > self.capacity and len(self._kept) > 1:
                (namespace, name), _ = self._kept.popitem(last=False)
                delete_cube(source, namespace, name)
                evicted.append(f"{namespace}/{name}")
        return evicted

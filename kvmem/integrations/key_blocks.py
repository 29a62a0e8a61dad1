"""A cube's keys in a paged KV cache's own block layout: a sidecar file a server reads straight into its blocks.

vLLM's CPU backend keeps a block's keys as columns per head (head h's [head_dim, block_size], token-minor:
`kvmem.integrations.paged_layout.PagedLayout.forms`), while a cube stores them as rows ([kv_heads, tokens,
head_dim]). A cold load therefore reads the keys into a buffer and copies them transposed into the blocks: one
extra pass over half the cube's bytes, on the cores the forward pass computes with. `write_key_blocks` writes the
keys once more, next to the cube, in the blocks' own order (``<cube>.keys-b<block_size>``: per layer ``kb.<i>``
[kv_heads, blocks, head_dim, block_size], the last block padded with zeros), so the loader reads them from the file
straight into the blocks as it reads the values (`kvmem.integrations.vllm_pages.BlockPlacement.read_key_blocks`).

The sidecar is a kvmem safetensors file with the cube's checksum discipline (a header checksum, one checksum per
layer verified as the layer is read: damaged bytes are a load error, never served) and it names the cube it was
written from (the checksums of the cube's header and keys): a sidecar of another or an older version of the cube
is not used (`open_key_blocks` returns None and the cube is loaded as without it). The cube itself is unchanged:
transformers (`kvmem.prefill`) loads it exactly as before, and a cube without a sidecar is served as before.

Who writes it: `write_key_blocks` (``python -m kvmem.integrations.key_blocks CUBE --block-size 128``), and the vLLM
connector for the cubes it saves into a folder or a store (`store_key_blocks`: beside a local store's blob, or under
a Redis key) (`kvmem.integrations.vllm`, ``key_blocks`` option).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import uuid
from pathlib import Path

import torch
import xxhash

from ..cubes.cubefile import CubeFile, PartFile
from ..cubes.format import HEADER_PART, write_cube_file
from ..errors import CubeError
from ..store.redis_blobs import staging_key
from ..store.redis_ranges import download_string, upload_string

FORMAT = "kvmem.key_blocks"
VERSION = 1
logger = logging.getLogger("vllm.kvmem")  # the connector's logger


def key_blocks_path(cube_path, block_size: int) -> Path:
    """Where the sidecar of the cube file ``cube_path`` for blocks of ``block_size`` tokens lives (not a
    ``.safetensors`` name, so a folder of cubes never lists it as a cube)."""
    cube_path = Path(cube_path)
    return cube_path.with_name(f"{cube_path.stem}.keys-b{int(block_size)}")


def cube_binding(cube: CubeFile) -> str:
    """xxh3-128 over the checksums of ``cube``'s header and every layer's keys: what a sidecar was written from."""
    names = [HEADER_PART] + [f"k.{i}" for i in range(cube.num_layers)]
    return xxhash.xxh3_128(json.dumps({n: cube.part_checksum(n) for n in names}, sort_keys=True).encode()).hexdigest()


def blocked_keys(keys: torch.Tensor, block_size: int) -> torch.Tensor:
    """Keys [kv_heads, T, head_dim] as [kv_heads, ceil(T / block_size), head_dim, block_size] (zero-padded)."""
    heads, total, dim = keys.shape
    nb = -(-total // block_size)
    padded = keys.new_zeros(heads, nb * block_size, dim)
    padded[:, :total] = keys
    return padded.view(heads, nb, block_size, dim).transpose(2, 3).contiguous()


def write_key_blocks(cube_path, *, block_size: int, out=None) -> Path:
    """Write the key-blocks sidecar of the cube file ``cube_path`` (read layer by layer and verified) for blocks of
    ``block_size`` tokens, atomically, to ``out`` (default `key_blocks_path`); its path.

    Raises:
        CubeError: the cube cannot be read layer by layer (an older or quantized cube: save it again with this
        kvmem), is damaged, or ``block_size`` is not a positive integer."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise CubeError(f"block_size must be a positive integer (the engine's KV block size), got {block_size!r:.40}")
    cube = CubeFile.open(cube_path)
    try:
        tensors = {}
        for i in range(cube.num_layers):
            keys = cube.read_part(f"k.{i}")
            tensors[f"kb.{i}"] = blocked_keys(keys.reshape(keys.shape[-3:]), block_size)
        meta = {"block_size": block_size, "tokens": int(cube.part_dtype_shape("k.0")[1][-2]),
                "num_layers": cube.num_layers, "cube": cube_binding(cube)}
        return write_cube_file(out or key_blocks_path(cube_path, block_size), FORMAT, meta, tensors, version=VERSION)
    finally:
        cube.close()


class KeyBlocks(PartFile):
    """An opened, verified key-blocks sidecar (`open_key_blocks`): ``block_size``, ``dtype``, and per layer the part
    ``kb.<i>`` read (and verified) through `PartFile.read_part_into`."""

    @property
    def block_size(self) -> int:
        return int(self._meta["block_size"])

    @property
    def dtype(self) -> torch.dtype:
        return self.part_dtype_shape("kb.0")[0]


def open_key_blocks(cube: CubeFile, block_size: int) -> KeyBlocks | None:
    """The sidecar of ``cube`` for blocks of ``block_size`` tokens (the file beside the cube's, or the byte source
    ``cube.key_blocks_source``: a Redis store's), verified to be this cube's (its header checksum, the cube's
    binding, every layer's shape and dtype); None when there is none or it does not fit (it was written from
    another version of the cube, or is damaged: logged), so the cube is loaded without it."""
    try:
        if cube.key_blocks_source is not None:
            if not cube.key_blocks_source.size:
                return None  # none was written
            path = f"key blocks of {cube.path}"
            blocks = KeyBlocks.over_parts(cube.key_blocks_source, where=path, fmt=FORMAT, version=str(VERSION))
        else:
            if not isinstance(cube.path, Path):
                return None
            path = key_blocks_path(cube.path, block_size)
            if not path.is_file():
                return None
            blocks = KeyBlocks.open_parts(path, fmt=FORMAT, version=str(VERSION))
    except CubeError as exc:
        logger.warning("kvmem: key blocks %s not used (%s); the cube's keys are copied into the blocks", path, exc)
        return None
    except Exception as exc:  # e.g. Redis gone for a moment: they only speed the load up, the cube still loads
        logger.warning("kvmem: key blocks of %s not read (%s: %s); the cube's keys are copied into the blocks",
                       cube.path, type(exc).__name__, exc)
        return None
    why = None
    meta = blocks.meta
    if meta.get("cube") != cube_binding(cube):
        why = "it was written from another version of the cube: write it again (write_key_blocks)"
    elif meta.get("block_size") != block_size or meta.get("num_layers") != cube.num_layers:
        why = f"it is for blocks of {meta.get('block_size')} tokens and {meta.get('num_layers')} layers"
    else:
        for i in range(cube.num_layers):
            dtype, shape = cube.part_dtype_shape(f"k.{i}")
            heads, total, dim = shape[-3:]
            want = (dtype, (heads, -(-total // block_size), dim, block_size))
            if blocks.part_dtype_shape(f"kb.{i}") != want:
                why = f"layer {i}'s keys are {blocks.part_dtype_shape(f'kb.{i}')}, the cube's would be {want}"
                break
    if why is not None:
        logger.warning("kvmem: key blocks %s not used: %s", path, why)
        blocks.close()
        return None
    return blocks


def redis_key(db, blob: str) -> str:
    """The Redis key of the key blocks of store blob ``blob`` (beside its ``blob`` key; deleted with it,
    `kvmem.store.redis_blobs.RedisBlobs.delete`). One per blob: the block size is in the sidecar's metadata."""
    return db.key("keyblocks", blob)


def store_key_blocks(store, blob: str, *, block_size: int, staging) -> tuple[str, int]:
    """Write the key blocks of store blob ``blob`` (a cube just put into ``store``, a
    `kvmem.store.cubestore.CubeStore`: read from its stamped bytes, this machine's copy) where its readers look: a
    file beside the blob in a local store's ``cubes/`` (`open_key_blocks` finds it by the blob's path; deleted with
    the blob), or a Redis store's key `redis_key` (staged in folder ``staging``), which a replica reads while it
    reads the cube from Redis. Returns where it went and its bytes.

    Raises:
        CubeError, OSError: as `write_key_blocks`, or the store cannot take them (the caller logs it: they only
        speed up loads)."""
    blobs = store.blobs
    path = blobs.local_path(blob)
    if path is None:
        raise CubeError(f"blob {blob} is not in {blobs.describe()}")
    db = getattr(blobs, "db", None)
    if db is None:  # a local store: the blob is a file
        side = write_key_blocks(path, block_size=block_size, out=key_blocks_path(path, block_size))
        nbytes = side.stat().st_size
        if not path.exists():  # the memory was deleted (or replaced) while they were written: theirs went with it
            side.unlink(missing_ok=True)
            raise CubeError(f"blob {blob} was deleted while its key blocks were written")
        return str(side), nbytes
    staged = write_key_blocks(path, block_size=block_size, out=Path(staging) / f"{blob}.keys-b{block_size}")
    upload = staging_key(db, blob, ".keys")
    try:
        with db.errors():
            size = upload_string(db.client, upload, staged)  # range by range (`upload_string`), then:
            # renamed into place only while the blob is there, in one step: a delete (another replica's replace,
            # `kvmem rm`) that came first would otherwise leave a key no delete or gc ever removes
            stored = db.client.eval(_RENAME_IF_BLOB, 3, db.key("blob", blob), upload, redis_key(db, blob))
    finally:
        staged.unlink(missing_ok=True)
    if stored == -1:
        raise CubeError(f"the key blocks of blob {blob} vanished from {db.url} before they were stored (expired or "
                        "evicted): store them again")
    if not stored:
        raise CubeError(f"blob {blob} was deleted from {db.url} before its key blocks were stored")
    return f"{db.url} {redis_key(db, blob)}", size


def fetch_key_blocks(db, blob: str, copy) -> Path | None:
    """Copy the key blocks a Redis store holds for ``blob`` (`redis_key`) beside ``copy``, this machine's local
    copy of the blob, so the loads from that copy read them too (`open_key_blocks` finds them by its path); the
    file written, or None when Redis holds none. Written atomically (a hidden file renamed), its header checked
    first; the cache's sweep removes them with the copy (`kvmem.store.redis_blobs.RedisBlobs.sweep`).

    Raises:
        CubeError: they are damaged (their header); a Redis error as the store reports it."""
    copy = Path(copy)
    staged = copy.with_name(f".{blob}.{uuid.uuid4().hex[:8]}.keys.tmp")  # hidden: swept if left unfinished
    try:
        with db.errors():  # in ranges, never the whole sidecar in memory
            if not download_string(db.client, redis_key(db, blob), staged):  # none, or deleted with its blob
                return None
        blocks = KeyBlocks.open_parts(staged, fmt=FORMAT, version=str(VERSION))
        try:
            size = blocks.block_size
        finally:
            blocks.close()
        final = key_blocks_path(copy, size)
        os.replace(staged, final)
    finally:
        staged.unlink(missing_ok=True)
    return final


# KEYS[1]: the blob's key, KEYS[2]: its key blocks' staging key (uploaded), KEYS[3]: their key. Run again (redis-py
# retries a call whose reply was lost), the staging key is gone and their key there: stored (or some replica's are)
_RENAME_IF_BLOB = ("if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) return 0 end "
                   "if redis.call('EXISTS', KEYS[2]) == 0 then "
                   "if redis.call('EXISTS', KEYS[3]) == 1 then return 1 end return -1 end "
                   "redis.call('RENAME', KEYS[2], KEYS[3]) redis.call('PERSIST', KEYS[3]) return 1")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a cube's key-blocks sidecar for a paged KV cache "
                                     "(vLLM CPU: --block-size 128), read straight into the cache's blocks.")
    parser.add_argument("cubes", nargs="+", help="cube files (.safetensors)")
    parser.add_argument("--block-size", type=int, required=True, help="the serving engine's KV block size")
    args = parser.parse_args(argv)
    for cube in args.cubes:
        try:
            print(write_key_blocks(cube, block_size=args.block_size))
        except CubeError as exc:
            raise SystemExit(f"kvmem: {exc}") from None


if __name__ == "__main__":
    main()

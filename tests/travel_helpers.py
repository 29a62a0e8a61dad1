"""Helpers for the bundle, install, market and migration tests: a store with memories, keys, raw bundle surgery."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from helpers import random_ids

TEXTS = ["Alice lives in Oslo and works as a marine biologist.",
         "Bob's favourite colour is green; he paints boats.",
         "The team meets every Tuesday at 10:00 in room 4B.",
         "Carol keeps the spare keys in the blue drawer."]


def fill_store(store, namespace: str, model, *, texts=TEXTS, cubes=(0, 1), seed: int = 0) -> dict:
    """Add ``texts`` as memories m0.. to ``namespace`` (meta with a turn and a date); those at ``cubes`` get a
    MemCube of ``model`` built from random ids (its text recorded). Returns {id: text}."""
    import kvmem

    view = store.view(namespace)
    out = {}
    for i, text in enumerate(texts):
        memory_id, meta = f"m{i}", {"turn": i, "date": "2024-05-0" + str(i + 1), "topic": "team"}
        if i in cubes:
            cube = kvmem.MemCube.from_ids(model, random_ids(9 + i, seed=seed + i), anchor_ids=random_ids(2, seed=99),
                                          text=text, name=memory_id)
            view.put_cube(memory_id, cube, text=text, meta=meta)
        else:
            view.add(memory_id, text, meta)
        out[memory_id] = text
    return out


def snapshot(store, namespace: str) -> dict:
    """What a namespace holds, comparable across writes: {id: (kind, text, meta, fingerprint, cube tensors)}."""
    view = store.view(namespace)
    out = {}
    for rec in view.ls():
        cube = view.load_cube(rec.id) if rec.kind == "memcube" else None
        kv = tuple(torch.cat([k.flatten(), v.flatten()]) for k, v in cube.kv) if cube is not None else None
        out[rec.id] = (rec.kind, rec.text, json.dumps(rec.meta, sort_keys=True), rec.fingerprint,
                       None if kv is None else hashlib.sha256(b"".join(t.numpy().tobytes() for t in kv)).hexdigest())
    return out


def make_key(folder: Path, name: str = "alice"):
    from kvmem.travel.signing import generate_key

    return generate_key(Path(folder) / f"{name}.key", name=name)


def trust_of(*keys):
    from kvmem.travel.signing import TrustList

    return TrustList([k.public for k in keys])


def raw_bundle(path: Path, manifest: dict, units: list[bytes], *, key=None, mtime: int = 1_700_000_000) -> Path:
    """A bundle written byte by byte from ``manifest`` (no checks: a forger's or a careless author's tool),
    signed by ``key`` if given. Unit entries get their file, bytes and sha256 filled in unless present."""
    from kvmem.travel.bundle import BLOCK, FORMAT, FORMAT_VERSION, MANIFEST, SIGNATURE, _end, canonical_json, \
        signature_bytes, tar_header

    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_unix": mtime, "sequence": 1,
                **manifest}
    for i, (entry, data) in enumerate(zip(manifest["units"], units)):
        entry.setdefault("file", f"units/{i:06d}.{'json' if entry['kind'] == 'text' else 'safetensors'}")
        entry.setdefault("bytes", len(data))
        entry.setdefault("sha256", hashlib.sha256(data).hexdigest())
    body = canonical_json(manifest)
    members = [(MANIFEST, body)] + ([(SIGNATURE, signature_bytes(key, body))] if key is not None else [])
    members += [(e["file"], d) for e, d in zip(manifest["units"], units)]
    out = bytearray()
    for name, data in members:
        out += tar_header(name, len(data), mtime) + data + bytes(-len(data) % BLOCK)
    out += bytes(_end(len(out)) - len(out))
    Path(path).write_bytes(bytes(out))
    return Path(path)


def record_bytes(memory_id: str, text: str, meta=None) -> bytes:
    return json.dumps({"id": memory_id, "text": text, "meta": meta or {}}).encode()


def text_entry(memory_id: str, text: str) -> dict:
    return {"kind": "text", "id": memory_id, "text_sha256": hashlib.sha256(text.encode()).hexdigest()}


def regions(bundle) -> list[tuple[str, int, int]]:
    """``(what, start, end)`` byte ranges of every part of a bundle file: headers, manifest, signature, each unit,
    paddings and tar's end."""
    from kvmem.travel.bundle import BLOCK

    out, pos = [], 0
    size = os.path.getsize(bundle.path)
    lengths = [("manifest", len(bundle.manifest_bytes))]
    data = Path(bundle.path).read_bytes()
    if bundle.signer is not None:
        sig_size = int(data[BLOCK + (len(bundle.manifest_bytes) + BLOCK - 1) // BLOCK * BLOCK + 124:][:11], 8)
        lengths.append(("signature", sig_size))
    lengths += [(f"{u.kind} {u.id}", u.bytes) for u in bundle.units]
    for what, n in lengths:
        out.append((f"{what} header", pos, pos + BLOCK))
        out.append((what, pos + BLOCK, pos + BLOCK + n))
        pos += BLOCK + n
        if n % BLOCK:
            out.append((f"{what} padding", pos, pos + (-n % BLOCK)))
            pos += -n % BLOCK
    out.append(("end of archive", pos, size))
    return [r for r in out if r[2] > r[1]]

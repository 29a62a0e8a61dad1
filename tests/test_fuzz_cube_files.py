"""Fuzzing cube files: a seeded loop of random damage to the bytes and the header, and of forged metadata edits;
nothing but a kvmem.CubeError (or the unchanged cube) may come out."""

from __future__ import annotations

import json
import random

from kvmem import CubeError, MemCube

from helpers import forge, header_len, join_file, load_or_usable, read_parts, same_cube, split_file

FUZZ_SEED, FUZZ_ROUNDS = 20240611, 400
FORGED_FUZZ_SEED, FORGED_FUZZ_ROUNDS = 7, 150


def _rand_bytes(rng: random.Random, lo: int = 1, hi: int = 16) -> bytes:
    return rng.randbytes(rng.randint(lo, hi))


def _flip_anywhere(rng, data):
    i, b = rng.randrange(len(data)), rng.randrange(8)
    out = bytearray(data)
    out[i] ^= 1 << b
    return bytes(out), f"flip bit {b} of byte {i}"


def _flip_in_header(rng, data):
    i, b = rng.randrange(8 + header_len(data)), rng.randrange(8)
    out = bytearray(data)
    out[i] ^= 1 << b
    return bytes(out), f"flip bit {b} of header byte {i}"


def _overwrite(rng, data):
    junk = _rand_bytes(rng, 1, 8)
    i = rng.randrange(len(data) - len(junk))
    return data[:i] + junk + data[i + len(junk):], f"overwrite {len(junk)} bytes at {i}"


def _truncate(rng, data):
    n = rng.randrange(len(data))
    return data[:n], f"truncate to {n} bytes"


def _insert(rng, data):
    junk, i = _rand_bytes(rng), rng.randrange(len(data) + 1)
    return data[:i] + junk + data[i:], f"insert {len(junk)} bytes at {i}"


def _delete(rng, data):
    i = rng.randrange(len(data))
    n = rng.randint(1, 16)
    return data[:i] + data[i + n:], f"delete {n} bytes at {i}"


def _fuzz_value(rng: random.Random, old):
    pool = [None, True, False, 0, -1, 1, 10 ** 6, 2 ** 63, 1.5, float("nan"), "", "x", "torch.float16", [], {},
            [1, 2], {"a": 1}, "[" * 50]
    if isinstance(old, bool):
        pool.append(not old)
    elif isinstance(old, int):
        pool += [old + 1, old - 1, -old]
    elif isinstance(old, str):
        pool += [old[:-1], old + "x", old.upper()]
    elif isinstance(old, list) and old:
        pool += [old[:-1], old + old[-1:], old[::-1]]
    return rng.choice(pool)


def _random_path(rng: random.Random, obj) -> list:
    """A random key path into nested dicts/lists (at least one step)."""
    path = []
    while True:
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj))) if isinstance(obj, list) else []
        if not keys or (path and rng.random() < 0.4):
            return path
        key = rng.choice(keys)
        path.append(key)
        obj = obj[key]


def _set_path(obj, path: list, value, *, delete: bool = False) -> None:
    for key in path[:-1]:
        obj = obj[key]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _mutate_meta(rng: random.Random, meta: dict) -> str:
    """Edit ``meta`` in place at a random nested place; returns a description."""
    path = _random_path(rng, meta)
    if rng.random() < 0.2:
        _set_path(meta, path, None, delete=True)
        return f"delete meta{path}"
    obj = meta
    for key in path:
        obj = obj[key]
    value = _fuzz_value(rng, obj)
    _set_path(meta, path, value)
    return f"meta{path} = {value!r:.40}"


def _header_tweak(rng, data):
    header, payload = split_file(data)
    md = header["__metadata__"]
    tensors = [k for k in header if k != "__metadata__"]
    what = rng.randrange(10)
    if what == 0:
        meta = json.loads(md["meta"])
        desc = _mutate_meta(rng, meta)
        md["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    elif what == 1:
        md["meta"] = rng.choice(["", "{", "[]", "null", "[" * 100_000, md["meta"][:-1], md["meta"] + " x"])
        desc = f"meta = {md['meta']!r:.30}"
    elif what == 2:
        name, dtype = rng.choice(tensors), rng.choice(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "XX"])
        header[name]["dtype"] = dtype
        desc = f"{name}.dtype = {dtype}"
    elif what == 3:
        name = rng.choice(tensors)
        shape = header[name]["shape"]
        if rng.random() < 0.5 and len(shape) > 1:
            shape = shape[::-1]
        else:
            shape = list(shape)
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 2])
        header[name]["shape"] = shape
        desc = f"{name}.shape = {shape}"
    elif what == 4:
        name, j, d = rng.choice(tensors), rng.randrange(2), rng.choice([-8, -4, -1, 1, 4, 8])
        header[name]["data_offsets"][j] += d
        desc = f"{name}.data_offsets[{j}] += {d}"
    elif what == 5:
        name = rng.choice(tensors)
        del header[name]
        desc = f"delete tensor {name}"
    elif what == 6:
        name, new = rng.choice(tensors), rng.choice(["k.9", "v.2", "ids", "k.0", "input_ids"])
        header[new] = header.pop(name)
        desc = f"rename tensor {name} -> {new}"
    elif what == 7:
        key = rng.choice(["format", "format_version", "checksum"])
        md[key] = rng.choice(["", "1", "2", "kvmem.memcube", "kvmem.adaptercube", md[key][:-1], md[key] + "0"])
        desc = f"{key} = {md[key]!r:.40}"
    elif what == 8:
        key = rng.choice(list(md))
        del md[key]
        desc = f"delete __metadata__.{key}"
    else:
        # swap the data offsets of two tensors of the same size: both tensors' bytes move
        a, b = rng.sample([t for t in tensors if t != "input_ids"], 2)
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        desc = f"swap data of {a} and {b}"
    return join_file(header, payload), f"header: {desc}"


MUTATORS = [_flip_anywhere, _flip_in_header, _overwrite, _truncate, _insert, _delete, _header_tweak, _header_tweak]


def test_fuzz_mutated_files_raise_cube_error(cube_bytes, cube, tmp_path):
    """Seeded random damage: every mutated file raises CubeError on load, or (when the damage did not change
    what the file says, e.g. an unchecked extra header key) loads as exactly the original cube."""
    rng = random.Random(FUZZ_SEED)
    path = tmp_path / "fuzz.safetensors"
    failures, refused, identical = [], 0, 0
    for i in range(FUZZ_ROUNDS):
        mutate = rng.choice(MUTATORS)
        data, desc = mutate(rng, cube_bytes)
        path.write_bytes(data)
        try:
            loaded = MemCube.load(path)
        except CubeError:
            refused += 1
            continue
        except Exception as exc:  # the bug this test exists for
            failures.append(f"#{i} {desc}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if data == cube_bytes or same_cube(loaded, cube):
            identical += 1
        else:
            failures.append(f"#{i} {desc}: loaded a cube that differs from the original")
    assert not failures, (f"{len(failures)} of {FUZZ_ROUNDS} mutations (seed {FUZZ_SEED}) escaped validation:\n"
                          + "\n".join(failures[:15]))
    assert refused > 0.9 * FUZZ_ROUNDS  # the fuzz really damages files


def test_fuzz_forged_metadata_never_crashes(cube_path, model, tmp_path):
    """Seeded random metadata edits with the checksum recomputed (so only validation stands in the way): each
    file is refused with CubeError at load or prefill, or gives a cube that works. Nothing else escapes."""
    rng = random.Random(FORGED_FUZZ_SEED)
    meta0, tensors = read_parts(cube_path)
    path = tmp_path / "forged.safetensors"
    failures, outcomes = [], {}
    for i in range(FORGED_FUZZ_ROUNDS):
        meta = json.loads(json.dumps(meta0))
        desc = _mutate_meta(rng, meta)
        forge(path, meta, tensors)
        try:
            outcome = load_or_usable(path, model)
        except Exception as exc:
            failures.append(f"#{i} {desc}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert not failures, (f"{len(failures)} of {FORGED_FUZZ_ROUNDS} forged edits (seed {FORGED_FUZZ_SEED}) escaped "
                          "as non-CubeError exceptions:\n" + "\n".join(failures[:15]))
    assert outcomes.get("refused at load", 0) + outcomes.get("refused at prefill", 0) > 0

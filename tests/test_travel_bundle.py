"""The bundle file (kvmem/travel/bundle.py) and its keys (signing.py): a plain tar any tool lists, every byte checked,
a signature over the manifest; tampered, malformed, compressed or forged bundles are refused with a CubeError."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import stat
import tarfile

import pytest

from kvmem.errors import CubeError
from travel_helpers import make_key, raw_bundle, record_bytes, regions, text_entry

crypto = pytest.importorskip("cryptography")


@pytest.fixture
def units(tmp_path):
    """Three memories, two with a (stand-in) cube file: (entry, path) pairs for write_bundle."""
    out = []
    for i, text in enumerate(["Alice lives in Oslo.", "Bob paints boats.", "Meetings are on Tuesdays."]):
        record = tmp_path / f"r{i}.json"
        record.write_bytes(record_bytes(f"m{i}", text))
        out.append((text_entry(f"m{i}", text), record))
        if i < 2:
            cube = tmp_path / f"c{i}.safetensors"
            cube.write_bytes(random.Random(i).randbytes(700 + 1000 * i))
            out.append(({**text_entry(f"m{i}", text), "kind": "memcube", "fingerprint": "0123456789abcdef",
                         "format_version": 1}, cube))
    return out


@pytest.fixture
def signed(tmp_path, units):
    from kvmem.travel.bundle import write_bundle

    key = make_key(tmp_path)
    return write_bundle(tmp_path / "notes.kvmem", {"name": "notes", "sequence": 3, "author": "Alice"}, units,
                        key=key), key


def test_a_bundle_is_a_plain_tar_with_the_units_bytes(signed, units):
    bundle, key = signed
    with tarfile.open(bundle.path, "r:") as tar:
        names = tar.getnames()
        assert names[:2] == ["kvmem-bundle.json", "kvmem-bundle.sig"]
        assert names[2:] == [u.file for u in bundle.units]
        for unit, (_, path) in zip(bundle.units, units):
            assert tar.extractfile(unit.file).read() == path.read_bytes()
        assert json.loads(tar.extractfile("kvmem-bundle.json").read()) == bundle.manifest
    assert bundle.signer.raw == key.public.raw and bundle.signer.name == ""  # names come from the trust list
    assert bundle.digest == hashlib.sha256(bundle.manifest_bytes).hexdigest()
    assert [u.kind for u in bundle.units] == ["text", "memcube", "text", "memcube", "text"]


def test_verify_reads_every_unit(signed):
    from kvmem.travel.bundle import verify_bundle

    seen = []
    bundle = verify_bundle(signed[0].path, progress=seen.append)
    assert sum(seen) == sum(u.bytes for u in bundle.units)


def test_unsigned_bundle_has_no_signer(tmp_path, units):
    from kvmem.travel.bundle import verify_bundle, write_bundle

    write_bundle(tmp_path / "u.kvmem", {"name": "notes", "sequence": 1}, units)
    assert verify_bundle(tmp_path / "u.kvmem").signer is None


def _mutate(data: bytes, rng: random.Random, start: int, end: int) -> bytes:
    m = bytearray(data)
    how = rng.randrange(5)
    i = rng.randrange(start, end)
    if how == 0:
        m[i] ^= 1 << rng.randrange(8)
    elif how == 1:
        m[i] = (m[i] + rng.randrange(1, 256)) % 256
    elif how == 2:
        n = rng.randrange(1, 40)
        m[i:i + n] = rng.randbytes(n)
    elif how == 3:
        del m[i:i + rng.choice([1, 7, 512, 10240])]
    else:
        m[i:i] = rng.randbytes(rng.choice([1, 3, 512]))
    return bytes(m)


def test_fuzz_every_byte_region_is_refused(signed, tmp_path):
    """A seeded fuzz over every region of the file (each header, the manifest, the signature, each unit, each
    padding, tar's end): 600 mutated bundles, none verifies."""
    from kvmem.travel.bundle import verify_bundle

    bundle, _ = signed
    data = bundle.path.read_bytes()
    parts = regions(bundle)
    assert {"manifest", "signature", "end of archive"} <= {what for what, _, _ in parts}
    rng = random.Random(25)
    refused = tried = 0
    for trial in range(600):
        what, start, end = parts[trial % len(parts)]
        bad = _mutate(data, rng, start, end)
        if bad == data:
            continue
        tried += 1
        path = tmp_path / "bad.kvmem"
        path.write_bytes(bad)
        with pytest.raises(CubeError):
            verify_bundle(path)
        refused += 1
    assert refused == tried >= 590


def test_structured_tampering_is_refused(signed, tmp_path):
    """A unit's bytes replaced, a unit dropped, two units traded, an edited manifest (still canonical), appended
    data, a truncated file."""
    from kvmem.travel.bundle import BLOCK, open_bundle, verify_bundle

    bundle, _ = signed
    data = bundle.path.read_bytes()
    cases = {}
    manifest = json.loads(bundle.manifest_bytes)
    manifest["units"][0]["text_sha256"] = "0" * 64
    edited = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert len(edited) == len(bundle.manifest_bytes)
    cases["manifest edited"] = data.replace(bundle.manifest_bytes, edited)
    cases["appended"] = data + bytes(10240)
    cases["trailing garbage"] = data[:-1] + b"x"
    cases["truncated to a record"] = data[:-10240] if len(data) > 10240 else data[:10240 - BLOCK]
    with tarfile.open(bundle.path) as tar:
        first = tar.extractfile(bundle.units[0].file).read()
        third = tar.extractfile(bundle.units[2].file).read()
    if len(first) <= len(third):
        cases["unit swapped"] = data.replace(third, first.ljust(len(third), b" "), 1)
    # a unit dropped whole (its header, bytes and padding), the rest of the file intact
    start = next(s for what, s, _ in regions(bundle) if what == "text m1 header")
    end = next(e for what, _, e in regions(bundle) if what in ("text m1 padding", "text m1") and e > start)
    cases["unit dropped"] = data[:start] + data[end:] + bytes(end - start)
    # two units of the same kind traded places, headers and all
    a = [(s, e) for what, s, e in regions(bundle) if what.startswith("text m0")]
    b = [(s, e) for what, s, e in regions(bundle) if what.startswith("text m2")]
    (a0, a1), (b0, b1) = (a[0][0], a[-1][1]), (b[0][0], b[-1][1])
    if a1 - a0 == b1 - b0:
        cases["units traded"] = data[:a0] + data[b0:b1] + data[a1:b0] + data[a0:a1] + data[b1:]
    assert {"unit dropped", "units traded", "manifest edited"} <= set(cases)
    for name, bad in cases.items():
        assert bad != data, name
        path = tmp_path / "bad.kvmem"
        path.write_bytes(bad)
        with pytest.raises(CubeError):
            verify_bundle(path)
    assert open_bundle(bundle.path).units == bundle.units


def test_forged_signature_and_other_signer(signed, tmp_path, units):
    from kvmem.travel.bundle import write_bundle, verify_bundle
    from kvmem.travel.bundle import SIGNATURE

    bundle, _ = signed
    mallory = make_key(tmp_path, "mallory")
    again = write_bundle(tmp_path / "m.kvmem", {"name": "notes", "sequence": 4}, units, key=mallory)
    assert verify_bundle(again.path).signer.raw == mallory.public.raw  # valid, but signed by someone else
    # the signature member of one bundle pasted into another: does not verify
    with tarfile.open(bundle.path) as tar:
        sig = tar.extractfile(SIGNATURE).read()
    with tarfile.open(again.path) as tar:
        other = tar.extractfile(SIGNATURE).read()
    assert len(sig) == len(other)
    path = tmp_path / "pasted.kvmem"
    path.write_bytes(again.path.read_bytes().replace(other, sig))
    with pytest.raises(CubeError, match="signature"):
        verify_bundle(path)


def test_compressed_and_sparse_bundles_are_refused_unread(signed, tmp_path):
    """A bundle that would decompress to far more than its size is never decompressed."""
    from kvmem.travel.bundle import open_bundle

    bundle, _ = signed
    bomb = tmp_path / "bomb.kvmem"
    bomb.write_bytes(gzip.compress(bundle.path.read_bytes() + bytes(50 << 20)))
    assert os.path.getsize(bomb) < 1 << 20
    with pytest.raises(CubeError, match="gzip-compressed"):
        open_bundle(bomb)
    # a GNU sparse member (declares more bytes than it stores) where the manifest should be
    info = tarfile.TarInfo("kvmem-bundle.json")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 1 << 40
    sparse = tmp_path / "sparse.kvmem"
    sparse.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + bytes(10240 - 512))
    with pytest.raises(CubeError):
        open_bundle(sparse)


def test_declared_sizes_are_bounded_before_reading(tmp_path):
    """A unit declaring 2**40 bytes is refused by the size check, not by running out of memory."""
    from kvmem.travel.bundle import open_bundle

    entry = {**text_entry("m0", "hi"), "bytes": 1 << 40}
    path = raw_bundle(tmp_path / "big.kvmem", {"name": "big", "units": [entry]}, [record_bytes("m0", "hi")])
    with pytest.raises(CubeError, match="lays out"):
        open_bundle(path)


@pytest.mark.parametrize("change, match", [
    ({"id": "../evil"}, "id"),
    ({"id": "a/b"}, "id"),
    ({"file": "../../etc/passwd"}, "named by their index"),
    ({"file": "units/000000.safetensors"}, "named by their index"),
    ({"kind": "script"}, "kind"),
    ({"sha256": "zz"}, "sha256"),
    ({"bytes": -1}, "bytes"),
    ({"lineage": "x"}, "lineage"),
    ({"extra": 1}, "known fields"),
])
def test_signed_but_malformed_manifests_are_refused(tmp_path, change, match):
    """A trusted signer may be careless or hostile: the manifest's rules hold whatever the signature says."""
    from kvmem.travel.bundle import open_bundle

    entry = {**text_entry("m0", "hi"), **change}
    path = raw_bundle(tmp_path / "x.kvmem", {"name": "x", "units": [entry]}, [record_bytes("m0", "hi")],
                      key=make_key(tmp_path))
    with pytest.raises(CubeError, match=match):
        open_bundle(path)


def test_manifest_level_rules(tmp_path):
    from kvmem.travel.bundle import open_bundle

    cube = {**text_entry("m1", "x"), "kind": "memcube", "fingerprint": "0" * 16, "format_version": 1}
    cases = {
        "belongs to no memory": ({"name": "x", "units": [cube]}, [b"c"]),
        "listed twice": ({"name": "x", "units": [text_entry("m0", "a"), text_entry("m0", "a")]},
                         [record_bytes("m0", "a")] * 2),
        "bundle name": ({"name": "../x", "units": []}, []),
        "version": ({"name": "x", "units": [], "format_version": 2}, []),
    }
    for match, (manifest, data) in cases.items():
        path = raw_bundle(tmp_path / "x.kvmem", manifest, data)
        with pytest.raises(CubeError, match=match):
            open_bundle(path)


def test_not_a_bundle(tmp_path):
    from kvmem.travel.bundle import open_bundle

    for data in (b"", b"hello", bytes(10240), os.urandom(20480)):
        path = tmp_path / "x.kvmem"
        path.write_bytes(data)
        with pytest.raises(CubeError):
            open_bundle(path)
    with pytest.raises(CubeError, match="no bundle"):
        open_bundle(tmp_path / "missing.kvmem")
    # a plain tar made by another tool is not a bundle either
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("kvmem-bundle.json")
        payload = json.dumps({"format": "kvmem.bundle"}).encode()
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "t.kvmem").write_bytes(buf.getvalue())
    with pytest.raises(CubeError):
        open_bundle(tmp_path / "t.kvmem")


def test_keys_and_trust_list(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from kvmem.travel.signing import TrustList, generate_key, load_signing_key, read_public_key

    key = generate_key(tmp_path / "k", name="Alice Example")
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600
    line = (tmp_path / "k.pub").read_text().strip()
    assert line.startswith("ssh-ed25519 AAAA") and line.endswith("Alice Example")
    loaded = load_signing_key(tmp_path / "k")
    assert loaded.public == key.public and read_public_key(tmp_path / "k.pub") == key.public
    assert key.public.verify(loaded.sign(b"m"), b"m") and not key.public.verify(loaded.sign(b"m"), b"n")
    with pytest.raises(CubeError, match="already exists"):
        generate_key(tmp_path / "k")
    trust = TrustList.load(tmp_path / "trusted")
    assert trust.keys == [] and trust.add(key.public) and not trust.add(key.public)
    assert TrustList.load(tmp_path / "trusted").find(key.public).name == "Alice Example"
    (tmp_path / "bad").write_text("ssh-rsa AAAAB3 x\n")
    with pytest.raises(CubeError, match="line 1"):
        TrustList.load(tmp_path / "bad")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa").write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    with pytest.raises(CubeError, match="not an Ed25519 key"):
        load_signing_key(tmp_path / "rsa")


def test_the_verify_bench_runs(tmp_path):
    """bench/bundle_verify.py --quick: builds, packs and verifies a real 5 MB bundle, and writes its rows."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bv.json"
    done = subprocess.run([sys.executable, str(root / "bench" / "bundle_verify.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["method"], r["cache"]) for r in rows} == {(m, c) for m in ("kvmem_verify", "sha256_file", "read_file")
                                                         for c in ("warm", "cold")}
    assert all(r["bytes"] > 5e6 and r["median_s"] > 0 for r in rows) and (tmp_path / "bv.png").exists()

"""The Redis store backend: the store conformance tests of test_store_backends.py run against a real Redis, plus
what only a shared server has (two machines' caches, an unreachable server, a flushed database).

Redis is Debian's ``redis-server`` (``apt-get install redis-server``; .ci/run installs it), started on a free
loopback port without persistence and stopped by pid. Without the binary (or the redis client) these skip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager

import pytest
import torch

import kvmem
import test_store_backends as conformance
from test_store_backends import cube, tiny_cube  # noqa: F401  (the conformance tests' fixture)

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install "
                                "redis-server); CI installs it")
redis = pytest.importorskip("redis", reason="the redis client is not installed (pip install 'kvmem[redis]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server(folder, *options: str, password: str | None = None, tls: dict | None = None):
    """A throwaway redis-server on a free loopback port (no persistence; ``options``: more of its command-line
    options, ``password``: its ``requirepass``; ``tls``: {"cert", "key", "ca"} file paths: it listens with TLS
    only, `tls_files`); yields its URL (``rediss://...?ssl_ca_certs=CA`` with TLS), stops it by pid."""
    port = free_port()
    listen = ["--port", str(port)]
    if tls:
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls["cert"]), "--tls-key-file",
                  str(tls["key"]), "--tls-ca-cert-file", str(tls["ca"]), "--tls-auth-clients", "no"]
    proc = subprocess.Popen([REDIS_SERVER, *listen, "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder), *options,
                             *(["--requirepass", password] if password else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password,
                             **({"ssl": True, "ssl_ca_certs": str(tls["ca"])} if tls else {}))
        deadline = time.time() + 20
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port} (exit {proc.poll()})")
                time.sleep(0.05)
        client.close()
        auth = f":{password}@" if password else ""
        yield (f"rediss://{auth}127.0.0.1:{port}/0?ssl_ca_certs={tls['ca']}" if tls
               else f"redis://{auth}127.0.0.1:{port}/0")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tls_files(folder, host: str = "127.0.0.1") -> dict:
    """A throwaway certificate authority and a server certificate it signed for ``host`` (an IP address), written
    into ``folder``: {"ca", "cert", "key"} paths (PEM), for `redis_server`'s ``tls``."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvmem test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder = Path(folder)
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def store_url(redis_url: str, tmp_path, name: str = "s", *, machine: str = "m1", tag: str | None = None) -> str:
    """A store of its own in the shared server (a fresh key prefix), with ``machine``'s local cache folder."""
    return f"{redis_url}?prefix=t{tag or uuid.uuid4().hex[:10]}{name}&cache={tmp_path / ('cache-' + machine)}"


@pytest.fixture
def make_store(redis_url, tmp_path):
    tag = uuid.uuid4().hex[:10]
    return lambda name="s": kvmem.CubeStore(store_url(redis_url, tmp_path, name, tag=tag))


# every conformance test, against Redis
globals().update({name: getattr(conformance, name) for name in dir(conformance) if name.startswith("test_")})


# ---------------------------------------------------------------- what only a shared server has
def test_two_machines_share_cubes_through_one_redis(redis_url, tmp_path, cube):  # noqa: F811
    tag = uuid.uuid4().hex[:10]
    one = kvmem.CubeStore(store_url(redis_url, tmp_path, tag=tag, machine="one"))
    two = kvmem.CubeStore(store_url(redis_url, tmp_path, tag=tag, machine="two"))
    assert one.blobs.cache != two.blobs.cache
    rec = one.view("team").put_cube("notes", cube)
    got = two.view("team").load_cube("notes")  # fetched into machine two's own folder, then validated
    assert got is not None and got.fingerprint == cube.fingerprint
    assert (two.blobs.cache / f"{rec.blob}.safetensors").is_file()
    assert two.view("other").load_cube("notes") is None  # namespaces hold across machines
    # replaced through machine two: machine one reads the new version
    other = tiny_cube("another text", seed=1)
    two.view("team").put_cube("notes", other)
    assert one.view("team").load_cube("notes").fingerprint == other.fingerprint
    assert one.view("team").get("notes").text == "another text"


def test_a_cache_folder_deleted_under_an_open_store_is_a_clear_error(redis_url, tmp_path, cube):  # noqa: F811
    tag = uuid.uuid4().hex[:10]
    one = kvmem.CubeStore(store_url(redis_url, tmp_path, tag=tag, machine="one"))
    one.view("team").put_cube("notes", cube)
    two = kvmem.CubeStore(store_url(redis_url, tmp_path, tag=tag, machine="two"))
    shutil.rmtree(two.blobs.cache)  # e.g. a tmp cleaner, while the server runs
    with pytest.raises(kvmem.CubeError, match="was deleted while the store was open: open the store again"):
        two.view("team").load_cube("notes")
    again = kvmem.CubeStore(store_url(redis_url, tmp_path, tag=tag, machine="two"))  # makes the folder again
    assert again.view("team").load_cube("notes").fingerprint == cube.fingerprint


def test_every_read_is_validated(redis_url, tmp_path, cube):  # noqa: F811
    store = kvmem.CubeStore(store_url(redis_url, tmp_path, machine="writer"))
    rec = store.view("me").put_cube("m", cube)
    key = store.blobs.db.key("blob", rec.blob)
    client = store.blobs.db.client
    data = bytearray(client.get(key))
    data[-8] ^= 0xFF  # one flipped payload byte in Redis
    client.set(key, bytes(data))
    reader = kvmem.CubeStore(f"{store.blobs.db.url.split('?')[0]}?prefix={store.blobs.db.prefix}"
                             f"&cache={tmp_path / 'reader'}")
    with pytest.raises(kvmem.CubeError, match="checksum mismatch"):
        reader.view("me").load_cube("m")
    client.set(key, b"not a cube at all")
    third = kvmem.CubeStore(f"{store.blobs.db.url.split('?')[0]}?prefix={store.blobs.db.prefix}"
                            f"&cache={tmp_path / 'third'}")
    with pytest.raises(kvmem.CubeError, match="not a valid safetensors file"):
        third.view("me").load_cube("m")
    # the writer's own copy holds the bytes it put (blob names are never reused), validated again on this read
    assert store.view("me").load_cube("m").fingerprint == cube.fingerprint


def test_unreachable_redis_is_a_clear_error(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(kvmem.CubeError, match=r"redis://127\.0\.0\.1:\d+/0 is unreachable"):
        kvmem.CubeStore(url + f"?cache={tmp_path}")


def test_server_gone_mid_use_is_a_clear_error(tmp_path, cube):  # noqa: F811
    with redis_server(tmp_path) as url:
        store = kvmem.CubeStore(f"{url}?cache={tmp_path / 'c'}")
        store.view("me").put_cube("m", cube)
    with pytest.raises(kvmem.CubeError, match="unreachable"):
        store.view("me").load_cube("m")


def big_cube() -> kvmem.MemCube:
    """A real MemCube of ~2.3 MB: 1,100 tokens, 2 layers, 2 KV heads of 64."""
    return tiny_cube("big", tokens=1100, hidden=256)


def test_a_cube_over_the_servers_string_limit_is_refused_clearly_and_nothing_is_stored(tmp_path, cube):  # noqa: F811
    """Redis keeps no string over its ``proto-max-bulk-len`` (512 MiB by default; a 4k-token cube of Llama 3 8B in
    bfloat16 is just over it): the error names the limit and its fix, and no row, blob or staging key is left behind."""
    big = big_cube()
    with redis_server(tmp_path, "--proto-max-bulk-len", "1mb") as url:
        store = kvmem.CubeStore(f"{url}?cache={tmp_path / 'c'}")
        view = store.view("me")
        with pytest.raises(kvmem.CubeError, match="proto-max-bulk-len.*CONFIG SET proto-max-bulk-len"):
            view.put_cube("big", big)
        assert view.get("big") is None and store.blobs.names() == {}
        client = redis.Redis.from_url(url)
        assert client.keys("*staging*") == []
        view.put_cube("small", cube)  # the store goes on working
        assert torch.equal(view.load_cube("small").input_ids, cube.input_ids)


def test_a_blob_is_uploaded_in_ranges_and_appears_whole_in_one_step(redis_url, tmp_path, monkeypatch):
    """A cube's bytes go up range by range under a staging key that expires (never one SET of the whole blob, nor
    the whole file in memory), and become the blob in one step: no reader sees a part of them."""
    import functools

    from kvmem.store import redis_blobs, redis_ranges

    big = big_cube()
    monkeypatch.setattr(redis_blobs, "upload_string", functools.partial(redis_ranges.upload_string, chunk=1 << 18))
    store = kvmem.CubeStore(store_url(redis_url, tmp_path))
    client = store.blobs.db.client
    seen = []
    put_range = redis_ranges.put_range

    def spy(c, key, offset, value, ttl):
        length = put_range(c, key, offset, value, ttl)
        seen.append((len(value), client.ttl(key), len(store.blobs.names())))
        return length

    monkeypatch.setattr(redis_ranges, "put_range", spy)
    rec = store.view("me").put_cube("big", big)
    assert len(seen) >= 8 and all(n <= 1 << 18 for n, _, _ in seen)
    assert all(0 < ttl <= 3600 for _, ttl, _ in seen)  # the staging key expires if its writer dies
    assert all(blobs == 0 for _, _, blobs in seen)  # no blob while its bytes go up
    key = store.blobs.db.key("blob", rec.blob)
    assert client.ttl(key) == -1 and client.strlen(key) == rec.bytes  # published whole, kept for good
    assert client.keys(f"{store.blobs.db.key('staging', '')}*") == []
    reader = kvmem.CubeStore(f"{redis_url}?prefix={store.blobs.db.prefix}&cache={tmp_path / 'cache-m2'}")
    got = reader.view("me").load_cube("big")
    for (k, v), (bk, bv) in zip(got.kv, big.kv, strict=True):
        assert torch.equal(k, bk) and torch.equal(v, bv)


def test_missing_or_flushed_store_is_an_error_not_an_empty_store(redis_url, tmp_path, cube):  # noqa: F811
    url = store_url(redis_url, tmp_path)
    with pytest.raises(kvmem.CubeError, match="no kvmem store at"):
        kvmem.CubeStore(url, create=False)
    store = kvmem.CubeStore(url)
    store.view("me").put_cube("m", cube)
    client = store.blobs.db.client
    client.delete(store.blobs.db.key("store"))  # the marker gone: flushed, or another database
    with pytest.raises(kvmem.CubeError, match="marker"):
        store.gc()
    with pytest.raises(kvmem.CubeError, match="marker"):
        kvmem.CubeStore(url)


def test_bad_urls(tmp_path):
    with pytest.raises(kvmem.CubeError, match="prefix"):
        kvmem.CubeStore(f"redis://127.0.0.1:1/0?prefix=a:b&cache={tmp_path}")
    for url in ("redis://:s3cret@127.0.0.1:port/0", "redis://user:s3@cret@127.0.0.1:port/0"):
        with pytest.raises(kvmem.CubeError, match="is not a Redis URL") as err:  # its password never shown
            kvmem.CubeStore(url)
        assert "s3" not in str(err.value) and "redis://***@127.0.0.1:port/0" in str(err.value)


def test_publishing_a_blob_twice_is_publishing_it_once(redis_url, tmp_path):
    """redis-py retries a call whose reply was lost: the publish script run again finds its staging key renamed
    already, and says so (1), not that the upload vanished; a staging key that did vanish is 0."""
    from kvmem.store.redis_blobs import _PUBLISH

    store = kvmem.CubeStore(store_url(redis_url, tmp_path))
    db = store.blobs.db
    blob, times = db.key("blob", "b" * 32), db.key("blobtime")
    db.client.set(db.key("staging", "x"), b"bytes", ex=60)
    for _ in range(2):
        assert db.client.eval(_PUBLISH, 3, db.key("staging", "x"), blob, times, "b" * 32, 1.5) == 1
    assert db.client.get(blob) == b"bytes" and db.client.ttl(blob) == -1 and db.client.hget(times, "b" * 32)
    assert db.client.eval(_PUBLISH, 3, db.key("staging", "y"), db.key("blob", "c" * 32), times, "c" * 32, 1.5) == 0
    assert not db.client.hexists(times, "c" * 32)

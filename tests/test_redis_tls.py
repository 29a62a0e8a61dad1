"""A Redis store over TLS (``rediss://``), against a real redis-server listening with TLS only and a certificate
authority made for the test: cubes saved and read back by a second machine, a replica's byte ranges read through
redis-py (`kvmem.store.redis_ranges.RangeReader` does not speak TLS) also after its blob source is sent to another
process as vLLM sends it to its worker, and an untrusted certificate named as such."""

from __future__ import annotations

import pickle

import pytest
import torch

import kvmem
from kvmem.errors import CubeError

pytest.importorskip("cryptography", reason="cryptography makes the test's certificates (pip install 'kvmem[test]')")
from test_store_redis import REDIS_SERVER, redis, redis_server, tls_files  # noqa: E402

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install "
                                "redis-server); CI installs it")


@pytest.fixture(scope="module")
def tls_url(tmp_path_factory):
    """``rediss://127.0.0.1:PORT/0?ssl_ca_certs=CA`` of a redis-server that accepts TLS only."""
    folder = tmp_path_factory.mktemp("redis-tls")
    with redis_server(folder, tls=tls_files(folder), password="tls*pw") as url:
        yield url


def test_the_server_refuses_plain_connections(tls_url):
    """The premise of the tests below: this server speaks TLS only, so a read that skipped TLS would fail."""
    port = int(tls_url.split(":")[3].split("/")[0])
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(host="127.0.0.1", port=port, password="tls*pw", socket_timeout=3).ping()


def test_a_store_over_tls_saves_and_serves_cubes(tls_url, cube, tmp_path):
    from kvmem.cubes.cubefile import CubeFile
    from kvmem.integrations.serving import CubeSource

    url = f"{tls_url}&prefix=tls"
    kvmem.CubeStore(f"{url}&cache={tmp_path / 'writer'}").view("ns").put_cube("m", cube, text="memory m")

    got = kvmem.CubeStore(f"{url}&cache={tmp_path / 'reader'}").view("ns").load_cube("m")  # a local copy, fetched
    for (k, v), (ck, cv) in zip(got.kv, cube.kv, strict=True):
        assert torch.equal(k, ck) and torch.equal(v, cv)

    source = CubeSource(store=f"{url}&cache={tmp_path / 'replica'}", defer_fetches=True)
    layered = source.load("ns", "m", layered=True)  # no local copy yet: byte ranges from Redis
    assert isinstance(layered, CubeFile) and layered._source.ranges is None  # through redis-py, over TLS
    moved = pickle.loads(pickle.dumps(layered))  # as vLLM sends a plan to its worker process
    assert moved._source.client is None
    for i, (k, v) in enumerate(cube.kv):
        mk, mv = moved.read_layer(i)
        assert torch.equal(mk, k) and torch.equal(mv, v)
    pool = moved._source.client.connection_pool
    assert pool.connection_kwargs.get("ssl_ca_certs") and pool.connection_kwargs["password"] == "tls*pw"


def test_an_untrusted_certificate_is_named_with_its_fix(tls_url):
    """Without the test's CA the server's certificate cannot be verified: the error says so and names the URL
    option that gives the CA, not "unreachable" alone."""
    url = tls_url.split("?")[0]  # no ssl_ca_certs: the system's CAs do not know the test's
    with pytest.raises(CubeError, match="certificate") as err:
        kvmem.CubeStore(url)
    assert "ssl_ca_certs" in str(err.value) and "tls*pw" not in str(err.value)

"""Installing a bundle into a Redis store (several machines share it): the journal, ledger and backups live in the
store itself, so an install, a replay check and a recovery work there as in a local store."""

from __future__ import annotations

import json

import pytest

import kvmem
from helpers import tiny_model
from kvmem.errors import CubeError
from test_store_redis import redis_server, store_url  # noqa: F401  (skips this module without redis-server/redis)
from travel_helpers import fill_store, make_key, snapshot, trust_of

pytest.importorskip("cryptography")


def test_install_into_a_redis_store(tmp_path):
    from kvmem.travel import install_bundle, pack_namespace, recover_installs
    from kvmem.travel.journal import JOURNALS, save_journal

    llama = tiny_model("llama")
    source = kvmem.CubeStore(tmp_path / "src")
    fill_store(source, "alice", llama)
    key = make_key(tmp_path)
    bundle = pack_namespace(source, "alice", tmp_path / "a.kvmem", key=key, sequence=2)
    with redis_server(tmp_path) as url:
        location = store_url(url, tmp_path)
        store = kvmem.CubeStore(location)
        report = install_bundle(bundle.path, store, "bob", trust=trust_of(key))
        assert sorted(report.installed) == ["m0", "m1", "m2", "m3"]
        assert snapshot(store, "bob").keys() == snapshot(source, "alice").keys()
        assert snapshot(kvmem.CubeStore(location), "bob") == snapshot(store, "bob")  # another process sees it all
        older = pack_namespace(source, "alice", tmp_path / "old.kvmem", key=key, sequence=1)
        with pytest.raises(CubeError, match="older bundle"):
            install_bundle(older.path, store, "bob", trust=trust_of(key))
        # a dead install's journal (another host, silent for an hour) is rolled back by the next recovery
        store.view("bob").add("half", "written by an install that died")
        save_journal(store, {"tx": "deadbeef" * 3, "namespace": "bob", "state": "write", "bundle": "x",
                             "new": ["half"], "replaced": {}, "adapters": [], "ledger": {}, "host": "elsewhere",
                             "boot": "", "pid": 1, "start": ""})
        journal = json.loads(store.view(JOURNALS).get("deadbeef" * 3).text)
        journal["heartbeat"] = 0
        store.view(JOURNALS).add(journal["tx"], json.dumps(journal))
        assert recover_installs(store) == ["x into bob: rolled back (it was killed before its commit point)"]
        assert store.view("bob").get("half") is None and store.view(JOURNALS).ls() == []

"""A marketplace is a folder or a bucket (kvmem/travel/market.py): publish bundles and an index there, search it,
install from it by URL, a local folder and an HTTP server on 127.0.0.1. The installed memories answer as a full
prefill does."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch

import kvmem
from kvmem.errors import CubeError
from helpers import last_logits, logit_tol, random_ids, tiny_model
from travel_helpers import fill_store, make_key, snapshot, trust_of

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
def market(tmp_path, llama):
    """A market folder with two published bundles; returns (folder, key, source store)."""
    from kvmem.travel import pack_namespace, publish_bundle

    key = make_key(tmp_path)
    source = kvmem.CubeStore(tmp_path / "src")
    fill_store(source, "team", llama)
    fill_store(source, "recipes", llama, texts=["Pancakes need eggs, milk and flour.", "Bake bread at 230 C."],
               cubes=(0,))
    folder = tmp_path / "market"
    for namespace, description in (("team", "who works where on the marine biology team"),
                                   ("recipes", "baking recipes: bread, pancakes")):
        bundle = pack_namespace(source, namespace, tmp_path / f"{namespace}.kvmem", key=key, sequence=1,
                                description=description, author="Alice")
        publish_bundle(bundle.path, str(folder))
    return folder, key, source


@pytest.fixture
def http_url(market):
    """The market folder served over HTTP on 127.0.0.1 (an ephemeral port), as any static file host would."""
    folder = market[0]
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_index_lists_what_was_published(market):
    from kvmem.travel import read_index

    folder, key, _ = market
    entries = {e["name"]: e for e in read_index(str(folder))}
    assert set(entries) == {"team", "recipes"}
    team = entries["team"]
    assert team["file"] == "team.kvmem" and team["units"] == 6 and team["signer"] == key.public.key_id
    assert team["bytes"] == (folder / "team.kvmem").stat().st_size and team["fingerprint"]


def test_search_ranks_by_description(market):
    from kvmem.travel import search_bundles

    folder = str(market[0])
    assert [e["name"] for e, _ in search_bundles(folder, "bread recipes")][0] == "recipes"
    assert [e["name"] for e, _ in search_bundles(folder, "marine biology")][0] == "team"
    assert search_bundles(folder, "quantum chromodynamics") == []
    assert {e["name"] for e, _ in search_bundles(folder, "")} == {"team", "recipes"}


def test_install_over_http_then_generate(market, http_url, tmp_path, llama):
    """Another user installs from a URL into a new store and generates with the memory: exact vs full prefill."""
    from kvmem.travel import install_bundle, search_bundles
    from kvmem.travel.market import local_copy

    folder, key, source = market
    (entry, _), = search_bundles(http_url, "biology team")
    url = f"{http_url}/{entry['file']}"
    store = kvmem.CubeStore(tmp_path / "bob-store")
    path, label = local_copy(url, tmp_path)
    report = install_bundle(path, store, "bob", trust=trust_of(key), label=label)
    assert len(report.installed) == 4
    assert snapshot(store, "bob").keys() == snapshot(source, "team").keys()
    assert store.view("bob").get("m0").meta["kvmem:provenance"]["source"] == url
    cube = store.view("bob").load_cube("m0")
    prefix = kvmem.prefill(llama, cube)
    query = random_ids(6, seed=3)
    full = last_logits(llama, prefix.extend(query))
    got = last_logits(llama, query[None], cache=prefix.cache)
    torch.testing.assert_close(got, full, rtol=0, atol=logit_tol(torch.float32, full.abs().max().item()))


def test_a_file_that_disagrees_with_the_index_is_refused(market, http_url, tmp_path):
    from kvmem.travel import fetch_bundle

    folder = market[0]
    data = bytearray((folder / "team.kvmem").read_bytes())
    data[-20000] ^= 1
    (folder / "team.kvmem").write_bytes(bytes(data))
    with pytest.raises(CubeError, match="does not match its entry"):
        fetch_bundle(f"{http_url}/team.kvmem", tmp_path)
    (folder / "team.kvmem").write_bytes(bytes(data) + bytes(10240))  # longer than the index says
    with pytest.raises(CubeError, match="larger than"):
        fetch_bundle(f"{http_url}/team.kvmem", tmp_path)
    with pytest.raises(CubeError, match="no bundle"):
        fetch_bundle(f"{http_url}/nothing.kvmem", tmp_path)


def test_a_folder_without_an_index(tmp_path):
    from kvmem.travel import read_index

    with pytest.raises(CubeError, match="no market index"):
        read_index(str(tmp_path))
    (tmp_path / "index.json").write_text('{"format": "something else"}')
    with pytest.raises(CubeError, match="not a kvmem market index"):
        read_index(str(tmp_path))


@pytest.mark.slow
def test_real_model_pack_serve_install_generate(smollm2, tmp_path):
    """The issue's scenario on SmolLM2: an author packs a namespace, a market serves it over HTTP, another user
    installs it into a new store and generates with it, exactly as with the memory prefilled as text."""
    from kvmem.travel import install_bundle, pack_namespace, publish_bundle
    from kvmem.travel.market import local_copy

    model, tok = smollm2
    mm = kvmem.wrap(model, tok)
    author = kvmem.CubeStore(tmp_path / "author")
    facts = {"pavel": "Pavel lives in Brno and repairs old clocks.", "ines": "Ines lives in Porto and teaches chess."}
    for memory_id, text in facts.items():
        author.view("team").put_cube(memory_id, mm.build_cube(text, name=memory_id), text=text)
    key = make_key(tmp_path)
    bundle = pack_namespace(author, "team", tmp_path / "team.kvmem", key=key, description="where people live")
    publish_bundle(bundle.path, str(tmp_path / "market"))
    folder = tmp_path / "market"

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path, label = local_copy(f"http://127.0.0.1:{server.server_address[1]}/team.kvmem", tmp_path)
        store = kvmem.CubeStore(tmp_path / "reader")
        install_bundle(path, store, "me", trust=trust_of(key), model=model, tokenizer=tok, label=label)
    finally:
        server.shutdown()
        server.server_close()
    cube = store.view("me").load_cube("pavel")
    question = "Where does Pavel live?"
    with_cube = mm.generate(question, [cube], max_new_tokens=12, do_sample=False)
    assert mm.last.injected
    without = mm.generate(question, [cube], inject=False, max_new_tokens=12, do_sample=False)
    assert torch.equal(with_cube, without)

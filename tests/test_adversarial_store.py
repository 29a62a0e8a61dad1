"""Nothing lost, nothing leaked (issue 11): the store, cube files and the scheduler under adversarial use.

Each test is a case that went wrong before: gc beside a live writer, a lost or damaged catalog, a forged path
column, sharing without a grant, unreadable files, modes, raw exceptions, tier byte counts."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

import kvmem
from kvmem.memory.scheduler import MemScheduler
from other_user import run_as_other_user
from test_store_backends import tiny_cube

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="module")
def cube():
    return tiny_cube()


@pytest.fixture
def shared_tmp():
    """A folder another OS user can reach (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="kvmem-adv-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run_as_other_user(code: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh python as a user without write access to root's files (nobody, when we are root),
    with a readable copy of kvmem: a checkout in a private folder works too (tests/other_user.py)."""
    return run_as_other_user(code, timeout=timeout)


# ---------------------------------------------------------------- 1. gc beside a live writer
def test_gc_between_a_writers_put_and_its_commit_keeps_the_cube(tmp_path, cube):
    """The exact interleaving of issue 11 #1, made deterministic: gc runs after the cube file is in place and
    before the catalog row is committed."""
    store = kvmem.CubeStore(tmp_path / "s")
    view = store.view("me")
    upsert = store.catalog.upsert

    def upsert_after_gc(rec):
        store.gc()
        return upsert(rec)

    store.catalog.upsert = upsert_after_gc
    view.put_cube("m", cube)
    store.catalog.upsert = upsert
    assert view.load_cube("m") is not None


_WRITER = """
import sys, kvmem
sys.path.insert(0, {tests!r})
from test_store_backends import tiny_cube
cube = tiny_cube()
view = kvmem.CubeStore({root!r}).view("w{n}")
for i in range(40):
    view.put_cube(f"m{{i % 5}}", cube)
print("done", flush=True)
"""


def test_gc_loop_beside_writer_processes(tmp_path):
    root = tmp_path / "s"
    kvmem.CubeStore(root)
    writers = [subprocess.Popen([PY, "-c", _WRITER.format(tests=str(ROOT / "tests"), root=str(root), n=n)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    store = kvmem.CubeStore(root, create=False)
    try:
        while any(w.poll() is None for w in writers):
            store.gc()
            time.sleep(0.01)
        outs = [w.communicate(timeout=120) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    for w, (out, err) in zip(writers, outs):
        assert w.returncode == 0 and "done" in out, err[-2000:]
    for n in range(2):
        view = store.view(f"w{n}")
        assert len(view.ls("memcube")) == 5
        for rec in view.ls():
            assert view.load_cube(rec.id) is not None
    assert store.gc().repaired == []


def test_rows_pointing_at_missing_files_are_repaired(tmp_path, cube):
    store = kvmem.CubeStore(tmp_path / "s")
    view = store.view("me")
    view.add("t", "plain text memory")
    rec = view.put_cube("m", cube, text="the memory text")
    (tmp_path / "s" / rec.path).unlink()
    # the request path does not break: the memory is text-only again
    assert view.load_cube("m") is None
    assert view.get("m").kind == "text" and view.get("m").text == "the memory text"
    view.put_cube("n", cube)
    (tmp_path / "s" / view.get("n").path).unlink()
    report = store.gc()
    assert report.repaired == ["me/n"] and view.get("n").kind == "text"


# ---------------------------------------------------------------- 2. a lost or damaged catalog
def _store_with_cubes(root, cube, n=3):
    view = kvmem.CubeStore(root).view("me")
    for i in range(n):
        view.put_cube(f"m{i}", cube)
    return sorted((root / "cubes").glob("*.safetensors"))


@pytest.mark.parametrize("damage", ["emptied", "deleted", "garbage", "replaced"])
def test_a_lost_catalog_is_an_error_and_gc_deletes_nothing(tmp_path, cube, damage):
    root = tmp_path / "s"
    files = _store_with_cubes(root, cube)
    catalog = root / "catalog.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{catalog}{suffix}").unlink(missing_ok=True)
    if damage == "emptied":
        catalog.write_bytes(b"")
    elif damage == "deleted":
        catalog.unlink()
    elif damage == "garbage":
        catalog.write_bytes(os.urandom(8192))
    else:  # another store's (empty) catalog copied over this one
        kvmem.CubeStore(tmp_path / "other")
        shutil.copy(tmp_path / "other" / "catalog.sqlite", catalog)
    with pytest.raises(kvmem.CubeError, match="catalog|backup") as info:
        kvmem.CubeStore(root).gc()
    assert "Traceback" not in str(info.value)
    assert sorted((root / "cubes").glob("*.safetensors")) == files  # the last copy of the texts is intact


def test_cube_files_without_any_catalog_or_marker(tmp_path, cube):
    root = tmp_path / "s"
    files = _store_with_cubes(root, cube)
    (root / "catalog.sqlite").unlink()
    (root / "kvmem-store.json").unlink()
    with pytest.raises(kvmem.CubeError, match="catalog was lost"):
        kvmem.CubeStore(root)
    assert sorted((root / "cubes").glob("*.safetensors")) == files


def test_a_missing_store_is_not_created_unless_asked(tmp_path):
    with pytest.raises(kvmem.CubeError, match="no kvmem store"):
        kvmem.CubeStore(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()
    kvmem.CubeStore(tmp_path / "new", create=True).view("me").add("m", "text")
    assert kvmem.CubeStore(tmp_path / "new", create=False).view("me").get("m").text == "text"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a store")
    with pytest.raises(kvmem.CubeError, match="not a kvmem store"):
        kvmem.CubeStore(tmp_path / "junk")


def test_a_store_from_before_markers_is_adopted(tmp_path):
    root = tmp_path / "s"
    kvmem.CubeStore(root).view("me").add("m", "old memory")
    (root / "kvmem-store.json").unlink()
    with sqlite3.connect(root / "catalog.sqlite") as db:
        for table in ("store", "reservations", "grants", "changes"):
            db.execute(f"DROP TABLE {table}")
    store = kvmem.CubeStore(root, create=False)
    assert store.view("me").get("m").text == "old memory" and (root / "kvmem-store.json").exists()
    store.view("me").add("n", "new memory")
    assert store.version() > 0


def test_damaged_rows_give_cube_errors_not_sqlite_or_json_tracebacks(tmp_path):
    root = tmp_path / "s"
    view = kvmem.CubeStore(root).view("me")
    view.add("m", "text")
    with sqlite3.connect(root / "catalog.sqlite") as db:
        db.execute("UPDATE memories SET meta='{not json'")
    with pytest.raises(kvmem.CubeError, match="damaged meta"):
        view.get("m")
    with sqlite3.connect(root / "catalog.sqlite") as db:
        db.execute("DROP TABLE memories")
    with pytest.raises(kvmem.CubeError, match="damaged|lacks"):
        kvmem.CubeStore(root).view("me").ls()


# ---------------------------------------------------------------- 3. paths are derived, never trusted
@pytest.mark.parametrize("forged", ["../victim.txt", "/ABSOLUTE", "cubes/../../victim.txt",
                                    "cubes/0123456789abcdef0123456789abcdef.safetensors/../../../victim.txt"])
def test_a_forged_path_column_touches_nothing_outside(tmp_path, cube, forged):
    root = tmp_path / "s"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    forged = forged.replace("/ABSOLUTE", str(victim))
    view = kvmem.CubeStore(root).view("me")
    for memory_id in ("a", "b", "c"):
        view.put_cube(memory_id, cube)
    with sqlite3.connect(root / "catalog.sqlite") as db:
        db.execute("UPDATE memories SET path=?", (forged,))
    assert view.load_cube("a") is None          # never opened; the row is repaired to text-only
    assert view.rm("b")                         # the row goes; the "file" it names is not touched
    view.add("c", "replaced text")              # replacing drops the old cube file: not the victim
    kvmem.CubeStore(root).gc(grace_s=0)
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------- 8. grants
def test_reading_another_namespace_needs_its_grant(tmp_path):
    store = kvmem.CubeStore(tmp_path / "s")
    store.view("alice").add("pin", "Alice's PIN is 4417.")
    with pytest.raises(kvmem.CubeError, match="has not shared"):
        store.view("mallory", shared=["alice"])
    assert store.view("mallory").get("alice/pin") is None


def test_same_id_in_own_and_shared_namespace(tmp_path):
    store = kvmem.CubeStore(tmp_path / "s")
    store.grant("team", "me")
    store.view("team").add("dog", "The team dog is Rex.")
    me = store.view("me", shared=["team"])
    me.add("dog", "My dog is Bella.")
    assert me.get("dog").text == "My dog is Bella." and me.get("team/dog").text == "The team dog is Rex."
    assert {r.qualified: r.text for r in me.ls()} == {"me/dog": "My dog is Bella.", "team/dog": "The team dog is Rex."}


# ---------------------------------------------------------------- 10. rough edges
def test_meta_must_be_json(tmp_path, cube):
    view = kvmem.CubeStore(tmp_path / "s").view("me")
    for meta in ({"when": object()}, {1: "int key"}, {"x": float("nan")}):
        with pytest.raises(kvmem.CubeError, match="JSON"):
            view.add("m", "text", meta)
        with pytest.raises(kvmem.CubeError, match="JSON"):
            view.put_cube("m", cube, meta=meta)
    assert view.get("m") is None


def test_swapped_arguments_are_named(tmp_path, cube):
    store = kvmem.CubeStore(tmp_path / "s")
    view = store.view("me")
    with pytest.raises(kvmem.CubeError, match="memory id"):
        view.add("Alice lives in Oslo.", "m1")
    with pytest.raises(kvmem.CubeError, match="memory id"):
        view.put_cube(cube, "m1")
    with pytest.raises(kvmem.CubeError, match="namespace"):
        store.view(["me"])
    with pytest.raises(kvmem.CubeError, match="store location"):
        kvmem.CubeStore(None)
    with pytest.raises(kvmem.CubeError, match="store view"):
        MemScheduler(cube)


def test_cube_files_and_store_folders_honour_the_umask(tmp_path, cube):
    old = os.umask(0o002)  # a group-shared store
    try:
        root = tmp_path / "s"
        rec = kvmem.CubeStore(root).view("me").put_cube("m", cube)
        cube.save(tmp_path / "plain.safetensors")
    finally:
        os.umask(old)
    for path in (root / rec.path, tmp_path / "plain.safetensors", root / "kvmem-store.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path
    for folder in (root, root / "cubes"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o775, folder


def test_load_on_a_device_this_build_lacks(tmp_path, cube):
    path = tmp_path / "c.safetensors"
    cube.save(path)
    bad = ["cuda"] if not torch.cuda.is_available() else [f"cuda:{torch.cuda.device_count()}"]
    for device in bad + ["tpu:0", 3.5]:
        with pytest.raises(kvmem.CubeError, match="device"):
            kvmem.MemCube.load(path, device=device)


def test_a_header_claiming_more_than_the_file_holds(tmp_path, cube):
    path = tmp_path / "c.safetensors"
    cube.save(path)
    data = bytearray(path.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(kvmem.CubeError, match="claims 1000000000000 bytes"):
        kvmem.MemCube.load(path)


def test_adapter_with_a_forged_rank_is_refused_before_allocating(tmp_path):
    peft = pytest.importorskip("peft")
    from kvmem.cubes.format import read_cube_file, write_cube_file
    from test_adversarial_fingerprint import _model

    model = peft.get_peft_model(_model(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    path = kvmem.AdapterCube.from_peft(model).save(tmp_path / "a.safetensors")
    meta, tensors = read_cube_file(path, "kvmem.adaptercube")
    meta["rank"] = meta["peft_config"]["r"] = 10**12
    write_cube_file(path, "kvmem.adaptercube", meta, tensors)  # a consistent checksum: xxh3 is no signature
    with pytest.raises(kvmem.CubeError, match="declares LoRA rank 1000000000000"):
        kvmem.AdapterCube.load(path)


def test_unreadable_cube_is_reported_as_permission_denied_not_corrupt(shared_tmp, cube):
    root = shared_tmp / "s"
    rec = kvmem.CubeStore(root).view("me").put_cube("m", cube)
    (root / rec.path).chmod(0o600)
    if os.geteuid() != 0:
        os.chmod(root / rec.path, 0o000)
    result = _run_as_other_user(f"""
        import kvmem
        try:
            kvmem.CubeStore({str(root)!r}, create=False).view("me").load_cube("m")
        except kvmem.CubeError as exc:
            print("CubeError:", exc)
        try:
            kvmem.MemCube.load({str(root / rec.path)!r})
        except kvmem.CubeError as exc:
            print("CubeError:", exc)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [l for l in result.stdout.splitlines() if l.startswith("CubeError")]
    assert len(lines) == 2 and all("permission denied" in l and "corrupt" not in l for l in lines), result.stdout


def test_a_read_only_store_can_still_be_listed(shared_tmp, cube):
    root = shared_tmp / "s"
    view = kvmem.CubeStore(root).view("me")
    view.add("t", "a plaintext memory")
    view.put_cube("m", cube)
    if os.geteuid() != 0:  # as root, the other user already lacks write access to root's 0644 / 0755 files
        for path in [root, root / "cubes", *root.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    result = _run_as_other_user(f"""
        import kvmem
        store = kvmem.CubeStore({str(root)!r}, create=False)
        view = store.view("me")
        print(sorted(r.id for r in view.ls()), view.load_cube("m") is not None, store.version())
        view.touch("m")
        try:
            view.add("x", "a write")
        except kvmem.CubeError as exc:
            print("CubeError:", exc)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "['m', 't'] True" in result.stdout
    assert "CubeError:" in result.stdout and "read-only" in result.stdout


@pytest.mark.parametrize("cached", [False, True], ids=["no-embedding-cache", "owners-embedding-cache"])
def test_a_read_only_store_can_be_searched_densely(shared_tmp, cached):
    """Dense search of a store this process may only read: the owner's embedding cache (if any) is read, what
    it lacks is embedded and not written; the CLI's search works without --lexical."""
    from kvmem.memory.encoder import dense_missing
    from kvmem.memory.index import MemoryIndex

    if dense_missing():
        pytest.skip(f"dense retrieval needs {dense_missing()}")
    root = shared_tmp / "s"
    view = kvmem.CubeStore(root).view("me")
    view.add("a", "Alice lives in Oslo and works as a carpenter.")
    view.add("b", "Bob owns a red bicycle with twelve gears.")
    cache = root / "embeddings.sqlite"
    if cached:
        assert MemoryIndex.from_store(view, dense=True).search("Where does Alice live?", k=1)[0][0] == "me/a"
    view.add("c", "Carol keeps three grey cats in her flat.")  # never embedded by the owner: not in any cache
    before = cache.read_bytes() if cached else None
    if os.geteuid() != 0:  # as root, the other user already lacks write access to root's 0644 / 0755 files
        for path in [root, root / "cubes", *root.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    result = _run_as_other_user(f"""
        import kvmem
        from typer.testing import CliRunner
        from kvmem.cli import app
        from kvmem.memory.index import MemoryIndex
        view = kvmem.CubeStore({str(root)!r}, create=False).view("me")
        index = MemoryIndex.from_store(view, dense=True)
        print("dense", index.describe()["dense"], "readonly", index._encoder.cache.readonly)
        print("top", index.search("Who has cats?", k=1)[0][0], index.search("Where does Alice live?", k=1)[0][0])
        out = CliRunner().invoke(app, ["search", "Who has cats?", "-k", "1", "--store", {str(root)!r},
                                       "--namespace", "me"])
        print("cli", out.exit_code, out.output.strip().splitlines()[-1:])
    """, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dense True readonly True" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "top me/c me/a" in result.stdout
    assert "cli 0" in result.stdout and "me/c" in result.stdout.split("cli 0", 1)[1], result.stdout
    assert "BM25 only" not in result.stdout
    if cached:
        assert cache.read_bytes() == before and not Path(f"{cache}-wal").exists()  # nothing was written
    else:
        assert not cache.exists()


# ---------------------------------------------------------------- scheduler: tier byte counts
class _Cube:
    def __init__(self, nbytes):
        self.nbytes = nbytes

    def to(self, *args, **kwargs):
        return self


class _View:
    def load_cube(self, memory_id, device=None):
        return None  # plaintext memories: cubes only come from promotion


def test_re_promoting_a_shared_memory_counts_its_bytes_once():
    """A shared memory's cube is never stored (the namespace is read-only), so it is promoted again and again:
    the CPU tier's byte count must stay the real size (issue: 2,995,200 counted vs 599,040 real after 6)."""
    size = 599_040
    sched = MemScheduler(_View(), device_capacity_bytes=0, cpu_capacity_bytes=10 * size, promote_after=1,
                         builder=lambda memory_id: _Cube(size))
    for _ in range(6):
        sched.retrieved("team/dog", has_cube=False)
    stats = sched.stats()
    assert stats["cpu_items"] == 1 and stats["cpu_bytes"] == size
    sched.prefetch(["team/dog"])
    sched.forget("team/dog")
    assert sched.stats()["cpu_bytes"] == 0


# ---------------------------------------------------------------- change detection across processes
def test_another_process_changes_are_seen_through_the_change_log(tmp_path):
    root = tmp_path / "s"
    view = kvmem.CubeStore(root).view("me")
    view.add("dog", "The dog is Rex.")
    v0 = view.version()
    script = f"""
        import kvmem
        view = kvmem.CubeStore({str(root)!r}, create=False).view("me")
        view.add("dog", "The dog is Bella now.")
        view.add("cat", "The cat is Tom.")
        view.rm("cat")
    """
    result = subprocess.run([PY, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    now, changes = view.changes_since(v0)
    assert changes == [("me", "dog", "add"), ("me", "cat", "add"), ("me", "cat", "rm")]
    assert view.get("dog").text == "The dog is Bella now." and now == view.version()


# ---------------------------------------------------------------- fuzz: random operations keep the invariants
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_keep_the_store_consistent(tmp_path, cube, seed):
    """Random adds, cube puts, removals, grants, revokes and gcs over three namespaces, checked against a plain
    model after every step: what each view sees, that every cube row has a valid file, that no file is unnamed
    after gc, and that replaying the change log gives the same ids as listing."""
    import random

    rng = random.Random(seed)
    root = tmp_path / "s"
    store = kvmem.CubeStore(root)
    names, ids = ["a", "b", "c"], ["x", "y", "z"]
    model: dict[tuple[str, str], str] = {}      # (namespace, id) -> kind
    grants: set[tuple[str, str]] = set()
    v0 = store.version()
    for step in range(60):
        op, ns, memory_id = rng.choice(["add", "cube", "rm", "grant", "revoke", "gc"]), rng.choice(names), rng.choice(ids)
        view = store.view(ns)
        if op == "add":
            view.add(memory_id, f"text {step}")
            model[ns, memory_id] = "text"
        elif op == "cube":
            view.put_cube(memory_id, cube, text=f"cube {step}")
            model[ns, memory_id] = "memcube"
        elif op == "rm":
            assert view.rm(memory_id) == ((ns, memory_id) in model)
            model.pop((ns, memory_id), None)
        elif op in ("grant", "revoke"):
            reader = rng.choice([n for n in names if n != ns])
            if op == "grant":
                store.grant(ns, reader)
                grants.add((ns, reader))
            else:
                assert store.revoke(ns, reader) == ((ns, reader) in grants)
                grants.discard((ns, reader))
        else:
            assert store.gc(grace_s=0).repaired == []
        for reader in names:  # each view sees exactly its own and its granted namespaces' memories
            shared = [o for o, r in grants if r == reader]
            seen = {(r.namespace, r.id): r.kind for r in store.view(reader, shared=shared).ls()}
            assert seen == {k: v for k, v in model.items() if k[0] == reader or k[0] in shared}
        for (ns_, id_), kind in model.items():
            if kind == "memcube":
                assert store.view(ns_).load_cube(id_) is not None
    store.gc(grace_s=0)
    named = {r.blob for r in store.catalog.list(None) if r.blob}
    assert set(store.blobs.names()) == named and not any(p.name.startswith(".") for p in (root / "cubes").iterdir())
    _, changes = store.view("a").changes_since(v0)
    replayed = set()
    for ns_, id_, op in changes:
        if op in ("add", "cube"):
            replayed.add((ns_, id_))
        elif op == "rm":
            replayed.discard((ns_, id_))
    assert replayed == {k for k in model if k[0] == "a"}

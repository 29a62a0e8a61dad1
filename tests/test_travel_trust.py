"""Revoked and expiring keys in the trust list: a bundle signed by a revoked key is refused by install (even with
--allow-unsigned) and by verify; a key past its expiry time is not trusted; the file format is OpenSSH's
(``@revoked`` marker, ``expiry-time="YYYYMMDD"`` option) and bad lines name their line."""

from __future__ import annotations

import datetime

import pytest
from typer.testing import CliRunner

import kvmem
from kvmem.cli import app
from kvmem.errors import CubeError
from travel_helpers import fill_store, make_key

pytest.importorskip("cryptography")
runner = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1"})
UTC = datetime.timezone.utc


@pytest.fixture
def signed(tmp_path):
    """(bundle path, alice's key, a second key) with a text-only bundle signed by alice."""
    from kvmem.travel import pack_namespace

    source = kvmem.CubeStore(tmp_path / "src")
    fill_store(source, "alice", None, cubes=())
    alice, other = make_key(tmp_path, "alice"), make_key(tmp_path, "carol")
    bundle = pack_namespace(source, "alice", tmp_path / "a.kvmem", key=alice, sequence=1)
    return bundle.path, alice, other


def test_a_revoked_key_is_refused_even_with_allow_unsigned(signed, tmp_path):
    from kvmem.travel import TrustList, install_bundle

    path, alice, carol = signed
    trust_file = tmp_path / "trusted_keys"
    keys = TrustList.load(trust_file)
    assert keys.add(alice.public) and keys.add(carol.public)
    assert keys.revoke(alice.public) and not keys.revoke(alice.public)
    lines = trust_file.read_text().splitlines()
    assert lines == [carol.public.line(), f"@revoked {alice.public.line()}"]  # its trusting line is gone
    reloaded = TrustList.load(trust_file)
    assert reloaded.is_revoked(alice.public) and reloaded.find(alice.public) is None
    assert reloaded.find(carol.public) is not None and reloaded.status(alice.public) == "revoked"
    store = kvmem.CubeStore(tmp_path / "dst")
    for allow in (False, True):
        with pytest.raises(CubeError, match="REVOKED.*not even with --allow-unsigned"):
            install_bundle(path, store, "bob", trust=reloaded, allow_unsigned=allow)
    assert store.view("bob").ls() == []
    with pytest.raises(CubeError, match="revoked.*delete its @revoked line"):
        reloaded.add(alice.public)  # un-revoking is done by hand


def test_a_key_past_its_expiry_is_not_trusted(signed, tmp_path):
    from kvmem.travel import TrustList, install_bundle

    path, alice, _ = signed
    trust_file = tmp_path / "trusted_keys"
    past = datetime.datetime(2020, 1, 2, tzinfo=UTC)
    assert TrustList.load(trust_file).add(alice.public, expires=past)
    assert trust_file.read_text() == f'expiry-time="20200102000000" {alice.public.line()}\n'
    keys = TrustList.load(trust_file)
    assert keys.expired(alice.public) == past and keys.find(alice.public) is None
    assert keys.status(alice.public).startswith("expired 2020-01-02")
    store = kvmem.CubeStore(tmp_path / "dst")
    with pytest.raises(CubeError, match="expired 2020-01-02"):
        install_bundle(path, store, "bob", trust=keys)
    assert store.view("bob").ls() == []
    report = install_bundle(path, store, "bob", trust=keys, allow_unsigned=True)  # recorded as not trusted
    assert report.installed and store.view("bob").get("m0").meta["kvmem:provenance"]["trusted"] is False
    future = datetime.datetime.now(UTC) + datetime.timedelta(days=30)
    assert keys.add(alice.public, expires=future)  # trusted again, until a later date: replaces its line
    assert len(trust_file.read_text().splitlines()) == 1
    keys = TrustList.load(trust_file)
    assert keys.find(alice.public) is not None and keys.expired(alice.public) is None
    assert install_bundle(path, tmp_path / "dst2", "bob", trust=keys).installed


@pytest.mark.parametrize("line, match", [
    ("@cert-authority ssh-ed25519 AAAA", "unknown marker"),
    ('expiry-time="2027" KEY', "unknown option"),
    ('expiry-time="20271399" KEY', "is not a date"),
    ('from="10.0.0.1" KEY', "unknown option"),
    ("@revoked", "not an Ed25519 public key line"),
])
def test_bad_trust_list_lines_name_their_line(signed, tmp_path, line, match):
    from kvmem.travel import TrustList

    trust_file = tmp_path / "trusted_keys"
    trust_file.write_text(f"# signers\n{signed[1].public.line()}\n" + line.replace("KEY", signed[2].public.line())
                          + "\n")
    with pytest.raises(CubeError, match=f"line 3: .*{match}"):
        TrustList.load(trust_file)


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_trust_revoke_and_expires_on_the_command_line(signed, tmp_path):
    path = signed[0]
    trusted = tmp_path / "trusted_keys"
    pub = tmp_path / "alice.key.pub"
    assert "until 2099-12-31" in _invoke("trust", pub, "--expires", "20991231", "--trusted-keys", trusted).output
    assert "TRUSTED" in _invoke("verify", path, "--trusted-keys", trusted).output
    result = _invoke("trust", pub, "--revoke", "--trusted-keys", trusted)
    assert result.exit_code == 0 and "revoked" in result.output
    for command in (["verify", path], ["install", path, "-n", "bob", "--store", tmp_path / "dst", "--allow-unsigned"]):
        result = _invoke(*command, "--trusted-keys", trusted)
        assert result.exit_code == 1, result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("kvmem:") and "REVOKED" in last, result.output
    result = _invoke("trust", pub, "--trusted-keys", trusted)
    assert result.exit_code == 1 and "@revoked line" in result.output
    result = _invoke("trust", pub, "--expires", "2027-01-01", "--trusted-keys", tmp_path / "other")
    assert result.exit_code == 1 and "YYYYMMDD" in result.output
    fresh = tmp_path / "fresh"
    _invoke("trust", pub, "--expires", "20200101", "--trusted-keys", fresh)
    assert "NOT trusted: expired 2020-01-01" in _invoke("verify", path, "--trusted-keys", fresh).output

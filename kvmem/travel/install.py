"""Install a bundle into a store: check every byte, the signer, the model binding and replays, then write all of its
units or none, in one step readers see whole.

Before anything is written the bundle is read once into a private folder, hashing every unit (kvmem/travel/
bundle.py), and every unit is validated as it will be used (records parsed, cubes fully loaded): bad input installs
nothing. Installs into one namespace are serialised by the store's lock of that namespace (kvmem/store/batch.py:
an fcntl lock on a local store, a Redis key with a token and an expiry); under it the replay check reads the
ledger, and the write is one store batch: every cube blob is staged (reserved and put, named by no row), each
AdapterCube is written under a hidden staged name in its folder, then ONE catalog commit writes every memory's row
and the ledger entry (``kvmem.ledger``: which sequence of which bundle a namespace holds) together. A reader sees the
namespace as before or as installed, never a mix. After the commit the replaced cubes are deleted and the adapter
files renamed in. A killed install is rolled back (before the commit) or finished (after it) when the store is next
opened (`CubeStore` runs the store's batch recovery), by the next install, or by `recover_installs`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..cubes.adaptercube import AdapterCube
from ..cubes.fingerprint import check_fields, fingerprint_fields
from ..cubes.memcube import MemCube
from ..errors import CubeError
from ..store.records import check_meta
from .bundle import Bundle, Unit, check_units, open_bundle
from ..store.batch import LOCK_WAIT_S, Batch, is_alive, lock, owner
from .journal import LEDGER, ledger_entry, ledger_id, recover_installs
from .provenance import PROVENANCE, adapter_folder, as_store, check_namespace
from .signing import TrustList



@dataclass
class InstallReport:
    """What `install_bundle` did. ``already``: this exact bundle was installed before (nothing written)."""

    bundle: str
    sequence: int
    digest: str
    namespace: str
    signer: str | None
    installed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    already: bool = False
    recovered: list[str] = field(default_factory=list)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- checks
def _trust(bundle: Bundle, trust: TrustList | None, allow_unsigned: bool) -> tuple[str | None, str | None, bool]:
    """(signer key id, signer name, trusted) or a CubeError saying why the bundle may not be installed."""
    if bundle.signer is None:
        if not allow_unsigned:
            raise CubeError(f"{bundle.path} is not signed: kvmem installs bundles signed by a key in your trust list; "
                            "ask its author for a signed one, or pass --allow-unsigned (recorded in each memory's "
                            "provenance)")
        return None, None, False
    trust = trust if trust is not None else TrustList.load()
    trust.refuse_revoked(bundle.signer, what=str(bundle.path))
    entry = trust.find(bundle.signer)
    expired = trust.expired(bundle.signer) if entry is None else None
    if expired is not None and not allow_unsigned:
        raise CubeError(f"{bundle.path} is signed by {bundle.signer.describe()}, whose trust in "
                        f"{trust.path or 'the trust list'} expired {expired:%Y-%m-%d %H:%M} UTC: trust it again "
                        "with a new date (`kvmem trust KEY.pub --expires YYYYMMDD`) if you still do, or pass "
                        "--allow-unsigned (recorded in each memory's provenance)")
    if entry is None and not allow_unsigned:
        where = trust.path or "the trust list"
        raise CubeError(f"{bundle.path} is signed by {bundle.signer.describe()}, which is not in {where}: if you trust "
                        f"that signer, add their public key (`kvmem trust KEY.pub`), or pass --allow-unsigned "
                        "(recorded in each memory's provenance)")
    return bundle.signer.key_id, (entry or bundle.signer).name, entry is not None


@dataclass
class _Memory:
    unit: Unit
    text: str
    meta: dict
    cube: Unit | None
    paths: dict


def _read_memory(unit: Unit, path: Path, cube: Unit | None, paths: dict) -> _Memory:
    try:
        record = json.loads(path.read_bytes())
    except (ValueError, RecursionError, OSError) as exc:
        raise CubeError(f"memory {unit.id!r} of the bundle is not a JSON record ({str(exc)[:80]})") from None
    if not isinstance(record, dict) or set(record) - {"id", "text", "meta", "created"} or record.get("id") != unit.id:
        raise CubeError(f"memory {unit.id!r} of the bundle is malformed (a record has the fields id, text, meta, "
                        "created)")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise CubeError(f"memory {unit.id!r} of the bundle has no text")
    if _sha256(text) != unit.entry["text_sha256"]:
        raise CubeError(f"memory {unit.id!r}: its text does not match the manifest's text_sha256")
    meta = check_meta(record.get("meta"))
    if PROVENANCE in meta:
        raise CubeError(f"memory {unit.id!r} carries its own {PROVENANCE!r}: provenance is written by the installer, "
                        "never taken from a bundle")
    if cube is not None and cube.entry["text_sha256"] != unit.entry["text_sha256"]:
        raise CubeError(f"the MemCube of {unit.id!r} was built from another text than the memory's")
    return _Memory(unit, text, meta, cube, paths)


def _check_cube(bundle: Bundle, memory: _Memory, target: dict | None, existing: set[str]) -> None:
    unit = memory.cube
    cube = MemCube.load(memory.paths[unit.file])  # full validation: format, checksum, shapes, dtypes
    _check_binding(bundle, unit, cube.fingerprint)
    if cube.text is not None and _sha256(cube.text) != unit.entry["text_sha256"]:
        raise CubeError(f"the MemCube of {unit.id!r} holds another text than its memory's")
    if target is not None:
        check_fields(cube.fingerprint_fields, target, what=f"the MemCube of {unit.id!r}")
    elif existing and cube.fingerprint not in existing:
        raise CubeError(f"the MemCube of {unit.id!r} is bound to model {cube.fingerprint}, the namespace's cubes to "
                        f"{', '.join(sorted(existing))}: install into another namespace, pass --model to check the "
                        "bundle against the model you will use, or migrate (`kvmem migrate --to-model`)")


def _check_binding(bundle: Bundle, unit: Unit, fingerprint: str) -> None:
    if fingerprint != unit.entry["fingerprint"]:
        raise CubeError(f"{unit.kind} {unit.id!r} is bound to model {fingerprint}, the manifest says "
                        f"{unit.entry['fingerprint']}")
    declared = (bundle.manifest.get("model") or {}).get("fingerprint")
    if unit.kind == "memcube" and declared is not None and fingerprint != declared:
        raise CubeError(f"MemCube {unit.id!r} is bound to another model ({fingerprint}) than the bundle's "
                        f"({declared})")


def _check_adapter(bundle: Bundle, unit: Unit, path: Path, model) -> AdapterCube:
    cube = AdapterCube.load(path)
    _check_binding(bundle, unit, cube.fingerprint)
    if model is not None:
        cube.check_base(model)
    return cube


def _check_replay(bundle: Bundle, before: dict | None) -> bool:
    """True if this exact bundle is installed already; CubeError for an older (replayed) or conflicting one."""
    if before is None:
        return False
    if before.get("sequence", -1) > bundle.sequence:
        raise CubeError(f"{bundle.path} is sequence {bundle.sequence} of bundle {bundle.name!r}, but sequence "
                        f"{before['sequence']} (installed {before.get('installed')}) is already installed here: an "
                        "older bundle never replaces a newer one (to go back on purpose, `kvmem rm` its memories "
                        "and install into a fresh namespace)")
    if before.get("sequence") == bundle.sequence:
        if before.get("digest") == bundle.digest:
            return True
        raise CubeError(f"sequence {bundle.sequence} of bundle {bundle.name!r} is installed here with another "
                        "content: two different bundles carry the same sequence; ask the author for a new one")
    return False


# ---------------------------------------------------------------------------------------------- install
def install_bundle(source, store, namespace: str, *, trust: TrustList | None = None, allow_unsigned: bool = False,
                   model=None, tokenizer=None, adapters=None, label: str | None = None,
                   progress: Callable[[str, int, int], None] | None = None,
                   lock_wait: float = LOCK_WAIT_S) -> InstallReport:
    """Verify ``source`` (a local bundle file) and install it into ``namespace`` of ``store``: all units or none.

    Args:
        source: the bundle file (`kvmem.travel.fetch_bundle` gets one from a URL first).
        store: a `CubeStore` or its location.
        namespace: the namespace to install into (memories keep their ids).
        trust: the signers to accept (default: `TrustList.load()`, ``~/.kvmem/trusted_keys``).
        allow_unsigned: install an unsigned bundle, or one whose signer is not trusted (recorded in provenance).
        model, tokenizer: the model the memories will be used with: every cube's fingerprint is checked against
            it. Without it, cubes must be bound to the model the namespace's cubes already are.
        adapters: the folder for AdapterCubes (default ``<store>/adapters/<namespace>`` for a local store).
        label: where the bundle came from, for provenance (default: its path).
        progress: called as ``progress(stage, done, total)``.
        lock_wait: seconds to wait for another install into ``namespace`` to finish (then CubeError).

    Returns:
        InstallReport.

    Raises:
        CubeError: an unsigned, untrusted, damaged or malformed bundle, a replayed older one, a unit bound to
            another model, a name that escapes, a revoked signer; another install into ``namespace`` still
            running after ``lock_wait`` seconds; nothing is installed.
    """
    store = as_store(store)
    namespace = check_namespace(namespace)
    bundle = open_bundle(source)
    signer, signer_name, trusted = _trust(bundle, trust, allow_unsigned)
    with lock(store, namespace, wait=lock_wait):  # one install into a namespace at a time (replay check included)
        return _install(store, namespace, bundle, source, (signer, signer_name, trusted), allow_unsigned=allow_unsigned,
                        model=model, tokenizer=tokenizer, adapters=adapters, label=label, progress=progress)


def _install(store, namespace, bundle, source, signed, *, allow_unsigned, model, tokenizer, adapters, label,
             progress) -> InstallReport:
    signer, signer_name, trusted = signed
    recovered = recover_installs(store)
    report = InstallReport(bundle.name, bundle.sequence, bundle.digest, namespace, signer, recovered=recovered)
    before = ledger_entry(store, namespace, signer, bundle.name)
    if _check_replay(bundle, before):
        report.already = True
        return report
    target = fingerprint_fields(model, tokenizer) if model is not None else None
    view = store.view(namespace)
    existing = {rec.id: rec for rec in view.ls()}
    bound = {rec.fingerprint for rec in existing.values() if rec.kind == "memcube" and rec.fingerprint}
    folder = adapter_folder(store, namespace, adapters)
    with _staging() as tmp:  # private (0700): nobody swaps a unit here
        done = [0]

        def read(n):
            done[0] += n
            if progress is not None:
                progress("verify", done[0], bundle.size)

        paths = check_units(bundle, extract_to=Path(tmp), progress=read)
        memories = [_read_memory(u, paths[u.file], bundle.cube_of(u.id), paths) for u in bundle.memories()]
        for memory in memories:
            if memory.cube is not None:
                _check_cube(bundle, memory, target, bound)
        adapter_units = [u for u in bundle.units if u.kind == "adaptercube"]
        if adapter_units and folder is None:
            raise CubeError("the bundle holds AdapterCubes and this store has no folder for them: pass --adapters DIR")
        for unit in adapter_units:
            _check_adapter(bundle, unit, paths[unit.file], model)
            _check_adapter_slot(folder / f"{unit.id}.safetensors", bundle, signer)
        provenance = {"bundle": bundle.name, "sequence": bundle.sequence, "digest": bundle.digest, "signer": signer,
                      "signer_name": signer_name, "trusted": trusted, "unsigned_allowed": bool(allow_unsigned),
                      "author": bundle.manifest.get("author", ""), "license": bundle.manifest.get("license", ""),
                      "source": label or str(Path(source)), "installed": _now()}
        _write(store, bundle, view, memories, adapter_units, paths, folder, existing, provenance, report, progress)
    return report


_STAGING = re.compile(r"kvmem-install-(\d+)-(\d+)-")


def _staging() -> tempfile.TemporaryDirectory:
    """A private folder the bundle's units are extracted to, named for this process (pid and start time).

    An install killed mid-way (SIGKILL, power cut) cannot remove its folder, and a bundle's extracted units can be
    as large as the bundle: so each install first removes the folders of this user's installs whose process is gone.
    """
    me = owner()
    if not me["start"]:  # no /proc: whether another install is alive cannot be told, so nothing is removed
        return tempfile.TemporaryDirectory(prefix="kvmem-install-")
    for path in Path(tempfile.gettempdir()).glob("kvmem-install-*"):
        match = _STAGING.match(path.name)
        try:
            mine = path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if match and mine and not is_alive({**me, "pid": int(match[1]), "start": match[2]}):
            shutil.rmtree(path, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"kvmem-install-{me['pid']}-{me['start']}-")


def _check_adapter_slot(path: Path, bundle: Bundle, signer: str | None) -> None:
    """An adapter file may only replace one an earlier sequence of the same bundle installed."""
    if not path.exists():
        return
    try:
        prov = AdapterCube.load(path).meta.get(PROVENANCE) or {}
    except CubeError:
        prov = {}
    if prov.get("bundle") != bundle.name or prov.get("signer") != signer:
        raise CubeError(f"{path} exists and did not come from bundle {bundle.name!r} by the same signer: remove it "
                        "or install into another namespace")


def _unit_provenance(provenance: dict, memory_or_unit) -> dict:
    unit = memory_or_unit.unit if isinstance(memory_or_unit, _Memory) else memory_or_unit
    out = {**provenance, "unit_sha256": unit.sha256, "created": unit.entry.get("created"),
           "lineage": unit.entry.get("lineage", [])}
    cube = getattr(memory_or_unit, "cube", None)
    if cube is not None:
        out.update(cube_sha256=cube.sha256, fingerprint=cube.entry["fingerprint"],
                   lineage=out["lineage"] + cube.entry.get("lineage", []))
    elif unit.kind == "adaptercube":
        out["fingerprint"] = unit.entry["fingerprint"]
    return out


def _write(store, bundle, view, memories, adapter_units, paths, folder, existing, provenance, report, progress):
    """Every memory, the ledger entry and the adapter files as one store batch (kvmem/store/batch.py)."""
    namespace = view.namespace
    batch = Batch(store, label=f"install of {bundle.name}#{bundle.sequence} into {namespace}")
    for memory in memories:
        meta = {**memory.meta, PROVENANCE: _unit_provenance(provenance, memory)}
        if memory.cube is not None:  # loaded (and fully validated again) when staged: one cube in memory at a time
            batch.put_cube(namespace, memory.unit.id, lambda path=paths[memory.cube.file]: MemCube.load(path),
                           text=memory.text, meta=meta)
        else:
            batch.add(namespace, memory.unit.id, memory.text, meta)
        (report.replaced if memory.unit.id in existing else report.installed).append(memory.unit.id)
    for unit in adapter_units:
        def write(staged, unit=unit):
            cube = AdapterCube.load(paths[unit.file])
            AdapterCube(cube.state_dict, {**cube.meta, PROVENANCE: _unit_provenance(provenance, unit)}).save(staged)

        path = folder / f"{unit.id}.safetensors"
        batch.put_file(path, write)
        report.adapters.append(str(path))
    ledger = {"namespace": namespace, "bundle": bundle.name, "signer": provenance["signer"],
              "sequence": bundle.sequence, "digest": bundle.digest, "installed": provenance["installed"]}
    batch.add(LEDGER, ledger_id(namespace, ledger["signer"], bundle.name), json.dumps(ledger, sort_keys=True))
    batch.commit(progress=None if progress is None else lambda done, total: progress("install", done, total))

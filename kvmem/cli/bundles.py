"""`kvmem keygen`, `trust`, `pack`, `verify`, `install`, `publish`, `search-bundles`, `migrate`: memory that travels."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from .app import NamespaceOpt, StoreOpt, _friendly, _load_model, app, open_store

TrustOpt = typer.Option(None, "--trusted-keys", help="Trust list file (default: $KVMEM_TRUSTED_KEYS or "
                                                     "~/.kvmem/trusted_keys).")


def _bar(desc: str):
    """A progress callback ``(stage, done, total)`` drawing one tqdm bar per stage on stderr."""
    from tqdm.auto import tqdm

    bars = {}

    def update(stage, done, total):
        bar = bars.get(stage)
        if bar is None:
            unit = "B" if stage == "verify" else "unit"
            bar = bars[stage] = tqdm(total=total, desc=f"kvmem: {desc} ({stage})", unit=unit, unit_scale=True,
                                     leave=False, disable=total < (64 << 20 if unit == "B" else 20))
        bar.update(done - bar.n)

    return update


@app.command()
@_friendly
def keygen(
    path: Path = typer.Argument(..., help="Private key file to write (its public key goes to PATH.pub)."),
    name: str = typer.Option("", "--name", help="Your name as signers see it (stored after the public key)."),
    trust: bool = typer.Option(False, "--trust", help="Also add the new public key to your trust list."),
    trusted_keys: Optional[Path] = TrustOpt,
):
    """Make an Ed25519 signing key pair for bundles (OpenSSH format; private key mode 0600)."""
    from ..travel.signing import TrustList, generate_key

    key = generate_key(path, name=name)
    typer.echo(f"wrote {path} (private: keep it secret) and {path}.pub; signer {key.public.describe()}")
    if trust:
        TrustList.load(trusted_keys).add(key.public)
        typer.echo(f"trusted {key.public.describe()}")


@app.command()
@_friendly
def trust(
    public_key: str = typer.Argument(..., help="A .pub file (or an 'ssh-ed25519 AAAA... name' line) to trust."),
    revoke: bool = typer.Option(False, "--revoke", help="Revoke the key instead: bundles it signed are refused "
                                                        "from now on, even with --allow-unsigned."),
    expires: Optional[str] = typer.Option(None, "--expires", help="Trust the key until this UTC date "
                                                                  "(YYYYMMDD[HHMM[SS]]), not after."),
    trusted_keys: Optional[Path] = TrustOpt,
):
    """Add a signer's public key to your trust list (`kvmem install` accepts the bundles it signs), or --revoke it."""
    from ..travel.signing import TrustList, parse_expiry, read_public_key

    key = read_public_key(public_key)
    keys = TrustList.load(trusted_keys)
    if revoke:
        if expires is not None:
            raise typer.BadParameter("--expires is for trusting a key; a revoked key has no expiry")
        done = keys.revoke(key)
        typer.echo(f"{'revoked' if done else 'already revoked'}: {key.describe()} ({keys.path})")
        return
    until = parse_expiry(expires) if expires is not None else None
    added = keys.add(key, expires=until)
    typer.echo(f"{'trusted' if added else 'already trusted'}: {key.describe()}"
               + (f" until {until:%Y-%m-%d %H:%M:%S} UTC" if until else "") + f" ({keys.path})")


@app.command()
@_friendly
def pack(
    out: Path = typer.Option(..., "--out", "-o", help="Bundle file to write (e.g. notes.kvmem)."),
    key: Optional[Path] = typer.Option(None, "--key", help="Private key to sign with (`kvmem keygen`)."),
    unsigned: bool = typer.Option(False, "--unsigned", help="Write an unsigned bundle (installs need "
                                                            "--allow-unsigned)."),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle name (default: the namespace)."),
    description: str = typer.Option("", "--description", help="What the memories are about (for search)."),
    author: str = typer.Option("", "--author", help="Author, kept in each installed memory's provenance."),
    license_: str = typer.Option("", "--license", help="License of the memories (e.g. CC-BY-4.0)."),
    sequence: Optional[int] = typer.Option(None, "--sequence", min=0, help="Bundle version (default: Unix time); "
                                                                           "installs refuse older over newer."),
    adapters: Optional[Path] = typer.Option(None, "--adapters", help="AdapterCube folder (default: "
                                                                     "<store>/adapters/<namespace>)."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Pack a namespace's memories (text + meta, MemCubes, AdapterCubes) into one signed bundle file."""
    from ..travel.pack import pack_namespace
    from ..travel.signing import load_signing_key

    if (key is None) == (not unsigned):
        raise typer.BadParameter("sign with --key KEY (make one with `kvmem keygen`), or pass --unsigned")
    signing = load_signing_key(key) if key is not None else None
    bundle = pack_namespace(open_store(store), namespace, out, key=signing, name=name, description=description,
                            author=author, license=license_, sequence=sequence, adapters=adapters)
    kinds = {k: sum(u.kind == k for u in bundle.units) for k in ("text", "memcube", "adaptercube")}
    typer.echo(f"wrote {out}: {kinds['text']} memories, {kinds['memcube']} MemCubes, {kinds['adaptercube']} "
               f"AdapterCubes, {bundle.size / 1e6:.1f} MB, sequence {bundle.sequence}, "
               + (f"signed by {bundle.signer.describe()}" if bundle.signer else "UNSIGNED"))


def _local(source: str, tmp: str) -> tuple[Path, str]:
    from ..travel.market import local_copy

    return local_copy(source, tmp)


@app.command()
@_friendly
def verify(
    source: str = typer.Argument(..., help="Bundle file or URL."),
    trusted_keys: Optional[Path] = TrustOpt,
):
    """Check every byte of a bundle and its signature; say who signed it and whether you trust them (exit 1 if the
    bundle is damaged, edited or not signed validly)."""
    from ..travel.bundle import check_units, open_bundle
    from ..travel.signing import TrustList

    with tempfile.TemporaryDirectory(prefix="kvmem-verify-") as tmp:
        path, label = _local(source, tmp)
        start = time.perf_counter()
        bundle = open_bundle(path)
        check_units(bundle, progress=None)
        elapsed = time.perf_counter() - start
    m = bundle.manifest
    keys = TrustList.load(trusted_keys)
    if bundle.signer is not None:  # exit 1: a revoked signer's bundle is refused like a damaged one
        keys.refuse_revoked(bundle.signer, what=label)
    status = keys.status(bundle.signer) if bundle.signer is not None else None
    model = m.get("model") or {}
    for key, value in [
        ("bundle", f"{m['name']} sequence {m['sequence']} ({m.get('created')}), {bundle.size / 1e6:.1f} MB"),
        ("valid", f"yes: every byte checked in {elapsed * 1e3:.0f} ms (manifest sha256 {bundle.digest[:16]})"),
        ("signer", (bundle.signer.describe() + (" TRUSTED" if status == "trusted" else " NOT in your trust list"
                                                if status == "not trusted" else f" NOT trusted: {status}"))
         if bundle.signer else "UNSIGNED"),
        ("units", ", ".join(f"{sum(u.kind == k for u in bundle.units)} {k}" for k in ("text", "memcube",
                                                                                      "adaptercube"))),
        ("model", f"{model.get('model_type')} {model.get('architectures')} ({model.get('fingerprint')})"
         if model else "none (text only, or several)"),
        ("author", m.get("author") or "-"), ("license", m.get("license") or "-"),
        ("description", m.get("description") or "-"),
    ]:
        typer.echo(f"{key:>12}  {value}")


@app.command()
@_friendly
def install(
    source: str = typer.Argument(..., help="Bundle file or URL (e.g. https://host/market/notes.kvmem)."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Install an unsigned bundle or an "
                                        "untrusted signer's (recorded in each memory's provenance)."),
    model: Optional[str] = typer.Option(None, "--model", help="Check every cube against this model (checkpoint "
                                                              "folder or 'smollm2')."),
    dtype: str = typer.Option("float32", help="Dtype to load --model in."),
    adapters: Optional[Path] = typer.Option(None, "--adapters", help="Folder for AdapterCubes (default: "
                                                                     "<store>/adapters/<namespace>)."),
    trusted_keys: Optional[Path] = TrustOpt,
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Verify a bundle and install all of its memories into a namespace, or none of them."""
    from ..travel.install import install_bundle
    from ..travel.signing import TrustList

    m = tok = None
    if model is not None:
        m, tok = _load_model(model, dtype)
    with tempfile.TemporaryDirectory(prefix="kvmem-fetch-") as tmp:
        path, label = _local(source, tmp)
        report = install_bundle(path, open_store(store, create=True), namespace, trust=TrustList.load(trusted_keys),
                                allow_unsigned=allow_unsigned, model=m, tokenizer=tok, adapters=adapters,
                                label=label, progress=_bar("install"))
    for line in report.recovered:
        typer.echo(f"recovered an unfinished install: {line}")
    who = f"signed by {report.signer}" if report.signer else "UNSIGNED (allowed)"
    if report.already:
        typer.echo(f"{report.bundle} sequence {report.sequence} is already installed in {namespace}: nothing to do")
        return
    typer.echo(f"installed {report.bundle} sequence {report.sequence} ({who}) into {namespace}: "
               f"{len(report.installed)} new, {len(report.replaced)} updated memories, {len(report.adapters)} adapters")


@app.command()
@_friendly
def publish(
    bundle: Path = typer.Argument(..., help="Bundle file to publish."),
    market: str = typer.Argument(..., help="Market folder or bucket URL (its index.json is updated)."),
):
    """Copy a bundle into a market (a folder or an fsspec bucket URL) and list it in the market's index.json."""
    from ..travel.market import publish_bundle

    entry = publish_bundle(bundle, market)
    typer.echo(f"published {entry['file']} ({entry['name']} sequence {entry['sequence']}, {entry['bytes'] / 1e6:.1f} "
               f"MB) to {market}")


@app.command("search-bundles")
@_friendly
def search_bundles(
    market: str = typer.Argument(..., help="Market folder or URL (holding index.json)."),
    query: str = typer.Argument("", help="What to look for (empty: list the newest)."),
    k: int = typer.Option(10, "-k", min=1, help="How many results."),
):
    """Search a market's bundles by name, description, author and model."""
    from ..travel.market import join, search_bundles as search

    for entry, score in search(market, query, k=k):
        model = entry.get("model") or {}
        typer.echo(f"{score:6.2f}  {entry.get('name')} #{entry.get('sequence')}  {join(market, entry['file'])}  "
                   f"{entry.get('units')} units, {int(entry.get('bytes') or 0) / 1e6:.1f} MB, model "
                   f"{model.get('model_type') or '-'}, signer {entry.get('signer') or 'UNSIGNED'}: "
                   f"{str(entry.get('description') or '')[:80]}")


@app.command()
@_friendly
def migrate(
    to_model: str = typer.Option(..., "--to-model", help="Target model: checkpoint folder, or 'smollm2'."),
    dtype: str = typer.Option("float32", help="Dtype to load the target model in (recorded in provenance)."),
    to_namespace: Optional[str] = typer.Option(None, "--to-namespace", help="Write the migrated memories there "
                                                                            "(default: in place)."),
    adapters: Optional[Path] = typer.Option(None, "--adapters", help="The namespace's AdapterCube folder."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Rebuild a namespace's MemCubes for another model from their memories' texts (names, meta, provenance kept)."""
    from ..travel.migrate import migrate_namespace

    m, tok = _load_model(to_model, dtype)
    report = migrate_namespace(open_store(store), namespace, m, tok, to_namespace=to_namespace, adapters=adapters,
                               progress=_bar("migrate"))
    typer.echo(f"migrated {namespace} -> {report.to_namespace} for model {report.fingerprint}: "
               f"{len(report.migrated)} cubes rebuilt, {len(report.already)} already there, "
               f"{len(report.text_only)} text-only (nothing to rebuild)")
    for name, why in report.not_migrated:
        typer.echo(f"not migrated: adapter {name}: {why}")

"""`kvmem add`, `search`, `ls`, `rm`, `stats`, `gc`, `repair`, `share`, `unshare`, `grants`, `ask`: the store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import CubeError
from .app import (
    NamespaceOpt,
    SharedOpt,
    StoreOpt,
    _default_store,
    _friendly,
    _load_model,
    _read_text,
    app,
    open_store,
    open_view,
)


@app.command()
@_friendly
def add(
    text: Optional[str] = typer.Argument(None, help="Memory text (or use --file)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the memory text from this UTF-8 file."),
    memory_id: Optional[str] = typer.Option(None, "--id", help="Memory id (default: a hash of the text)."),
    cube: bool = typer.Option(False, "--cube", help="Also build its activation cube now (loads the model)."),
    model: str = typer.Option("smollm2", help="Model for --cube: local checkpoint folder or 'smollm2'."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Store the cube quantized: int8 or int4 "
                                           "(approximate; its measured error is kept with it)."),
    ttl: Optional[float] = typer.Option(None, "--ttl", help="Seconds until the memory expires (invisible, then "
                                                            "removed by gc with what derives from it)."),
    expires: Optional[str] = typer.Option(None, "--expires", help="When the memory expires: an ISO datetime "
                                                                  "(UTC unless it names a zone) or epoch seconds."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Add a plaintext memory (optionally with its cube) to a store namespace; creates the store if needed."""
    if (text is None) == (file is None):
        raise typer.BadParameter("give the memory text as an argument or with --file, not both")
    if quantize is not None and not cube:
        raise typer.BadParameter("--quantize applies to the cube: add --cube")
    if quantize not in (None, "int8", "int4"):
        raise typer.BadParameter(f"--quantize must be int8 or int4, got {quantize!r}")
    from ..store.expiry import is_expired

    if file is not None:
        text = _read_text(file)
    if expires is not None:
        try:  # epoch seconds as a number; anything else is read as an ISO datetime (and checked there)
            expires = float(expires)
        except ValueError:
            pass
    view = open_view(store, namespace, [], create=True)
    rec = view.add(memory_id or view.mint_id(text), text, ttl=ttl, expires=expires)
    if cube:
        from ..memory_model import wrap

        m, tok = _load_model(model, "float32")
        built = wrap(m, tok).build_cube(text, name=rec.id, progress=True)
        try:
            rec = view.put_cube(rec.id, built, text=text, quantize=quantize)
        except CubeError as exc:  # the text row is committed: say so, not put_cube's "nothing was committed"
            why = str(exc).split("; nothing was committed")[0]
            raise CubeError(f"{rec.qualified} was added as text, but its cube was not stored ({why}); build it "
                            f"again with `kvmem add --cube --id {rec.id}`") from None
    typer.echo(f"added {rec.qualified}" + (f" with a {rec.tokens}-token {quantize + ' ' if quantize else ''}cube "
                                           f"({rec.bytes / 1e6:.1f} MB)" if rec.kind == "memcube" else "")
               + (f", expires {_when(rec.meta['expires'])}" if rec.meta.get("expires") is not None else "")
               + (" (already expired: invisible, and removed by the next gc)" if is_expired(rec.meta) else ""))


def _when(epoch: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@app.command()
@_friendly
def search(
    query: str = typer.Argument(..., help="What to look for."),
    k: int = typer.Option(5, "-k", min=1, help="How many results."),
    lexical: bool = typer.Option(False, "--lexical", help="BM25 only (no embedding model)."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
    shared: list[str] = SharedOpt,
):
    """Search the memories a namespace can see (own + shared), best first."""
    from ..memory.index import MemoryIndex

    view = open_view(store, namespace, shared)
    index = MemoryIndex.from_store(view, dense=False if lexical else "auto")
    why = index.describe().get("lexical_only_because")
    if why and not lexical:
        typer.echo(f"kvmem: searching with BM25 only: {why}", err=True)
    for memory_id, score in index.search(query, k=k):
        rec = view.get(memory_id)
        if rec is None:
            continue
        text = rec.text.replace("\n", " ")
        typer.echo(f"{score:7.3f}  {rec.qualified}  {text[:90]}{'...' if len(text) > 90 else ''}")


@app.command("ls")
@_friendly
def ls_(
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
    shared: list[str] = SharedOpt,
    provenance: bool = typer.Option(False, "--provenance", help="Also show where each memory came from (bundle, "
                                                                "signer, source, migrations)."),
):
    """List the memories a namespace can see (expired ones are not), and its stale AdapterCubes."""
    from ..store.forgetting import stale_adapters
    from ..store.lineage import foreign_sources

    view = open_view(store, namespace, shared)
    for rec in view.ls():
        text = rec.text.replace("\n", " ")
        cube = f"cube {rec.tokens} tok {rec.bytes / 1e6:.1f} MB" if rec.kind == "memcube" else "text only"
        typer.echo(f"{rec.namespace}/{rec.id:<24} {cube:<24} hits {rec.hits:<4} {text[:60]}")
        if rec.meta.get("expires") is not None:
            typer.echo(f"    expires: {_when(rec.meta['expires'])}")
        if foreign_sources(rec):
            typer.echo("    derived from: " + ", ".join(e["memory"] for e in foreign_sources(rec)))
        if provenance:
            from ..travel.provenance import describe_provenance

            typer.echo(f"    from: {describe_provenance(rec.meta)}")
    for namespace_ in view.namespaces:
        for a in stale_adapters(view.store, namespace_):
            typer.echo(f"adapter {a['adapter']}: STALE, learned " + ", ".join(f"{s['memory']} ({s['reason']})"
                                                                         for s in a["stale"]))


@app.command()
@_friendly
def rm(
    memory_id: str = typer.Argument(..., help="Memory id to delete (own namespace only)."),
    receipt: bool = typer.Option(False, "--receipt", help="Print everything removed or invalidated: the cube "
                                                          "files, units derived from it, stale adapters."),
    as_json: bool = typer.Option(False, "--json", help="Print the receipt as JSON."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Delete a memory, its cube, and every stored unit derived from it, from a namespace."""
    done = open_view(store, namespace, []).forget(memory_id)
    if not done:
        typer.echo(f"kvmem: no memory {memory_id!r} in namespace {namespace!r}", err=True)
        raise typer.Exit(1)
    if as_json:
        import json

        typer.echo(json.dumps(done.as_dict(), indent=2))
    elif receipt:
        for line in done.lines():
            typer.echo(line)
    else:
        typer.echo(f"removed {namespace}/{memory_id}" + (f" and {len(done.dependants)} units derived from it"
                                                         if done.dependants else ""))


@app.command()
@_friendly
def stats(
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
    shared: list[str] = SharedOpt,
):
    """Counts and sizes of what a namespace can see."""
    for key, value in open_view(store, namespace, shared).stats().items():
        typer.echo(f"{key:>12}  {value}")


@app.command()
@_friendly
def gc(
    grace: float = typer.Option(600.0, "--grace", min=0, help="Leave files and unfinished writes younger than "
                                                              "this many seconds to their writers."),
    store: Optional[str] = StoreOpt,
):
    """Remove cube files no memory names and repair memories whose cube file is missing (they become text-only).
    Refuses to run on a damaged or missing catalog."""
    report = open_store(store).gc(grace_s=grace)
    for name in report.removed:
        typer.echo(f"removed {name}")
    for name in report.swept:
        typer.echo(f"removed unfinished {name}")
    for qualified in report.repaired:
        typer.echo(f"repaired {qualified}: its cube file was missing; it is text-only now")
    for why in report.kept:
        typer.echo(f"kept {why}")
    for qualified in report.expired:
        typer.echo(f"expired {qualified}: removed")
    for d in report.invalidated:
        typer.echo(f"removed derived {d['memory']} (made from {d['source']['memory']}, {d['source']['reason']})")
    for a in report.stale_adapters:
        typer.echo(f"stale adapter {a['adapter']}: learned " + ", ".join(f"{s['memory']} ({s['reason']})"
                                                                        for s in a["stale"]))
    typer.echo(f"gc: {len(report.removed) + len(report.swept)} files removed, {len(report.repaired)} memories "
               f"repaired, {len(report.expired)} expired, {len(report.invalidated)} derived units removed")


@app.command()
@_friendly
def repair(
    folder: Optional[str] = typer.Argument(None, help="Store folder (or give --store)."),
    store: Optional[str] = StoreOpt,
):
    """Rebuild a lost, emptied or damaged catalog from the store's cube files (the old catalog is moved aside).
    Memories without a cube file, grants and use counts lived only in the catalog and cannot come back."""
    from ..store.cubestore import CubeStore

    if folder is not None and store is not None and folder != store:
        raise typer.BadParameter(f"two stores given ({folder} and --store {store}): give one")
    location = str(folder or store or _default_store())
    if not location.startswith(("redis://", "rediss://", "unix://")):
        location = Path(location).expanduser()
    report = CubeStore.rebuild_catalog(location)
    for name in report.moved_aside:
        typer.echo(f"moved the old catalog file aside: {name}")
    for qualified in report.rebuilt:
        typer.echo(f"rebuilt {qualified}")
    for qualified in report.recovered:
        typer.echo(f"recovered {qualified}: its cube file does not record its memory id (written by an older kvmem)")
    for why in report.skipped:
        typer.echo(f"skipped {why}")
    for why in report.conflicts:
        typer.echo(f"conflict {why}")
    typer.echo(f"repair: {len(report.rebuilt) + len(report.recovered)} memories rebuilt from cube files, "
               f"{len(report.skipped)} files skipped (the next gc removes them), {len(report.kept)} memories kept "
               f"from the old catalog, {len(report.conflicts)} conflicts left in place (gc keeps those files). "
               f"Not recoverable: {report.lost}")


@app.command()
@_friendly
def share(
    reader: str = typer.Argument(..., help="Namespace that may read (or '*' for every namespace)."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Let READER read the memories of --namespace (a recorded grant, revocable with `kvmem unshare`)."""
    open_store(store).grant(namespace, reader)
    typer.echo(f"{reader} may read {namespace}'s memories (undo: kvmem unshare {reader} -n {namespace})")


@app.command()
@_friendly
def unshare(
    reader: str = typer.Argument(..., help="Namespace whose read access to --namespace ends."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Withdraw READER's read access to the memories of --namespace."""
    if not open_store(store).revoke(namespace, reader):
        typer.echo(f"kvmem: {namespace} had not shared with {reader}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{reader} may no longer read {namespace}'s memories")


@app.command()
@_friendly
def grants(store: Optional[str] = StoreOpt):
    """List the share grants of a store (owner -> reader)."""
    for owner, reader in open_store(store).grants():
        typer.echo(f"{owner} -> {reader}")


@app.command()
@_friendly
def ask(
    question: str = typer.Argument(..., help="The question."),
    model: str = typer.Option("smollm2", help="Local checkpoint folder, or 'smollm2' for the bundled model."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    max_new_tokens: int = typer.Option(64, min=1, help="Most tokens to generate."),
    lexical: bool = typer.Option(False, "--lexical", help="Pick memories with BM25 only (no embedding model)."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
    shared: list[str] = SharedOpt,
):
    """Answer QUESTION with memory picked from the store (cubes="auto"); the memories used go to stderr."""
    from ..memory_model import wrap

    view = open_view(store, namespace, shared)
    m, tok = _load_model(model, dtype)
    options = {}
    if lexical:
        from ..memory.index import MemoryIndex

        options["index"] = MemoryIndex(dense=False)
    mm = wrap(m, tok).attach(view, **options)
    typer.echo(mm.answer(question, cubes="auto", max_new_tokens=max_new_tokens))
    last = mm.last
    used = ", ".join(f"{x.get('namespace')}/{x.get('id')} ({x.get('source')})" for x in last.memories) or "none"
    typer.echo(f"memories: {used}; TTFT {last.ttft_s * 1e3:.0f} ms", err=True)


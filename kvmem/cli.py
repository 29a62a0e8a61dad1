"""The `kvmem` command: build, inspect and demo MemCubes; keep, share, search and ask a store of memories.

Fast to start: nothing heavy (torch, transformers) is imported until a command needs it, and transformers'
progress bars and logs stay out of the output. A `CubeError` anywhere ends the command with its one-line
message and exit status 1, not a traceback.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

import typer

from .errors import CubeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="kvmem: persistent memory (KV-cache MemCubes, LoRA AdapterCubes) for HuggingFace transformers.")

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _friendly(command):
    """Run ``command``; a CubeError becomes ``kvmem: <message>`` on stderr and exit status 1."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CubeError as exc:
            typer.echo(f"kvmem: {exc}", err=True)
            raise typer.Exit(1) from None
    return run


def _quiet_transformers() -> None:
    """Keep transformers' and the hub's progress bars and info logs out of the command's output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _read_text(path: Path) -> str:
    """A UTF-8 text file's content, or a BadParameter saying what is wrong with it."""
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise typer.BadParameter(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                                 f"{exc.start}); convert it first, e.g. iconv -f latin1 -t utf-8") from None
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}") from None


def _load_model(model: str, dtype: str, *, tokenizer: bool = True):
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real_model import load_smollm2

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(_DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model == "smollm2":
        return load_smollm2(dtype=torch_dtype, device=device)
    path = Path(model)
    if not path.is_dir():
        raise typer.BadParameter(f"--model {model!r}: give a local transformers checkpoint folder, or 'smollm2' "
                                 "(kvmem never downloads models)")
    try:
        tok = AutoTokenizer.from_pretrained(path) if tokenizer else None
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval(), tok
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"--model {model!r}: cannot load a causal LM{' and its tokenizer' if tokenizer else ''} "
                                 f"from it ({str(exc).splitlines()[0]})") from None


@app.command()
@_friendly
def build(
    text_file: Path = typer.Argument(..., help="UTF-8 text file with the memory."),
    out: Path = typer.Option(..., "--out", "-o", help="Cube file to write (.safetensors)."),
    name: Optional[str] = typer.Option(None, help="Cube name (default: the text file's stem)."),
    model: str = typer.Option("smollm2", help="Local checkpoint folder, or 'smollm2' for the bundled model."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    chat: bool = typer.Option(True, help="Build after the chat template's system header (for kvmem.wrap)."),
    anchor: Optional[str] = typer.Option(None, help="Explicit anchor text (overrides --chat)."),
):
    """Turn a text file into a MemCube (its KV cache), with a progress bar for long texts."""
    from .memory_model import wrap
    from .cube import MemCube

    text = _read_text(text_file)
    m, tok = _load_model(model, dtype)
    try:
        if anchor is None and chat:
            anchor = wrap(m, tok).anchor
        cube = MemCube.from_text(m, tok, text, name=name or text_file.stem, anchor=anchor, progress=True)
        path = cube.save(out)
    except CubeError as exc:
        typer.echo(f"kvmem: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(f"wrote {path}: {cube.num_tokens} tokens (+{cube.anchor_len} anchor), {cube.nbytes / 1e6:.1f} MB, "
               f"fingerprint {cube.fingerprint}")


@app.command("build-adapter")
@_friendly
def build_adapter(
    peft_dir: Path = typer.Argument(..., help="PEFT LoRA adapter folder (adapter_config.json + safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", help="AdapterCube file to write (.safetensors)."),
    name: Optional[str] = typer.Option(None, help="Cube name (default: the folder name)."),
    model: str = typer.Option("smollm2", help="Base model: local checkpoint folder, or 'smollm2'."),
    dtype: str = typer.Option("float32", help="Base model dtype: float32, bfloat16 or float16."),
):
    """Package a PEFT LoRA adapter as an AdapterCube bound to its base model."""
    from .adapter import AdapterCube

    m, _ = _load_model(model, dtype, tokenizer=False)
    try:
        cube = AdapterCube.from_peft(peft_dir, name=name, base_model=m)
        path = cube.save(out)
    except CubeError as exc:
        typer.echo(f"kvmem: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(f"wrote {path}: LoRA rank {cube.rank} on {', '.join(cube.target_modules)}, "
               f"{cube.nbytes / 1e6:.2f} MB, base fingerprint {cube.fingerprint}")


def _inspect_adapter(cube_file: Path, as_json: bool):
    from .adapter import AdapterCube

    cube = _load_or_exit(AdapterCube.load, cube_file)
    meta = cube.meta
    base = meta["base_fingerprint_fields"]["model"]
    _report(cube_file, meta, as_json, lambda: [
        ("file", f"{cube_file} ({cube_file.stat().st_size / 1e6:.2f} MB on disk)"),
        ("valid", "yes (format, version, checksum, weights digest)"),
        ("kind", "AdapterCube (parametric memory, LoRA)"),
        ("name", cube.name),
        ("lora", f"rank {cube.rank}, alpha {meta['config_facts'].get('lora_alpha')}, on "
                 f"{', '.join(cube.target_modules)}"),
        ("weights", f"{len(cube.state_dict)} tensors, {cube.nbytes / 1e6:.2f} MB, digest {cube.digest[:16]}"),
        ("base", f"{base.get('model_type')} {base.get('architectures')}, fingerprint {cube.fingerprint}"),
        ("provenance", f"{meta.get('provenance')} (peft {meta.get('peft_version')})"),
        ("created", f"{meta.get('created')} by kvmem {meta.get('kvmem_version')}"),
    ])


def _load_or_exit(load, cube_file: Path):
    """``load(cube_file)``, or print why the file is not a valid cube and exit 1."""
    try:
        return load(cube_file)
    except CubeError as exc:
        typer.echo(f"INVALID: {exc}", err=True)
        raise typer.Exit(1)


def _report(cube_file: Path, meta: dict, as_json: bool, rows) -> None:
    """Print a valid cube's metadata as JSON, or the (key, value) pairs ``rows()`` gives as a table."""
    if as_json:
        typer.echo(json.dumps({**meta, "valid": True, "bytes": cube_file.stat().st_size}, indent=2))
        return
    for key, value in rows():
        typer.echo(f"{key:>12}  {value}")


@app.command()
@_friendly
def inspect(
    cube_file: Path = typer.Argument(..., help="Cube file to inspect."),
    as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
    tokens: int = typer.Option(20, help="How many leading token ids to show."),
):
    """Show a cube's (MemCube or AdapterCube) metadata, size and fingerprint, and whether it is valid (exit 1 if
    not)."""
    from .cube import MemCube
    from .cube_format import peek_format

    if cube_file.is_file() and peek_format(cube_file) == "kvmem.adaptercube":
        return _inspect_adapter(cube_file, as_json)

    cube = _load_or_exit(MemCube.load, cube_file)
    meta = cube.meta
    model = meta["fingerprint_fields"]["model"]
    adapter = meta["fingerprint_fields"].get("adapter")
    text = (meta.get("text") or "").replace("\n", " ")
    _report(cube_file, meta, as_json, lambda: [
        ("file", f"{cube_file} ({cube_file.stat().st_size / 1e6:.1f} MB on disk)"),
        ("valid", "yes (format, version, checksum, shapes, dtypes)"),
        ("kind", "MemCube (activation memory)"),
        ("name", cube.name),
        ("tokens", f"{cube.num_tokens} (+{cube.anchor_len} anchor tokens {meta.get('anchor')!r})"),
        ("ids", " ".join(map(str, cube.input_ids[0, :tokens].tolist())) + (" ..." if cube.num_tokens > tokens else "")),
        ("text", (text[:100] + "...") if len(text) > 100 else text or "(built from ids)"),
        ("kv", f"{meta['num_layers']} layers x {meta['kv_shapes'][0][0]} ({meta['dtype']}), {cube.nbytes / 1e6:.1f} MB"),
        ("fingerprint", cube.fingerprint),
        ("model", f"{model.get('model_type')} {model.get('architectures')}, {model.get('num_hidden_layers')} layers, "
                  f"hidden {model.get('hidden_size')}"),
        ("weights", meta["fingerprint_fields"]["weights"]),
        ("tokenizer", meta["fingerprint_fields"].get("tokenizer") or "(not recorded)"),
        ("adapter", json.dumps(adapter) if adapter else "none"),
        ("created", f"{meta.get('created')} by kvmem {meta.get('kvmem_version')}"),
    ])


@app.command()
@_friendly
def demo(
    question: str = typer.Option("Where does Pavel live?", help="Question about the bundled team notes."),
    max_new_tokens: int = typer.Option(24, min=1, help="Tokens to generate per answer."),
    repeats: int = typer.Option(3, min=1, help="TTFT samples per method (median is shown)."),
):
    """The main job: real model, real cube from disk, both answers and the TTFT saving."""
    from .demo import run_demo

    run_demo(question=question, max_new_tokens=max_new_tokens, repeats=repeats, echo=typer.echo)


# ---------------------------------------------------------------- the store
def _default_store() -> str:
    return os.environ.get("KVMEM_STORE") or str(Path.home() / ".kvmem" / "store")


StoreOpt = typer.Option(None, "--store", help="Store folder or redis:// URL (default: $KVMEM_STORE or ~/.kvmem/store).")
NamespaceOpt = typer.Option("default", "--namespace", "-n", help="Namespace to read and write.")
SharedOpt = typer.Option([], "--shared", help="Namespaces that shared with this one (read-only; repeatable).")


def _store(store: Optional[str], *, create: bool = False):
    """The store at ``--store``; only commands that write create one (a mistyped path is an error)."""
    from .store import CubeStore

    location = str(store) if store is not None else _default_store()
    return CubeStore(location if location.startswith(("redis://", "rediss://", "unix://"))
                     else Path(location).expanduser(), create=create)


def _view(store: Optional[str], namespace: str, shared: list[str], *, create: bool = False):
    return _store(store, create=create).view(namespace, shared=shared)


@app.command()
@_friendly
def add(
    text: Optional[str] = typer.Argument(None, help="Memory text (or use --file)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the memory text from this UTF-8 file."),
    memory_id: Optional[str] = typer.Option(None, "--id", help="Memory id (default: a hash of the text)."),
    cube: bool = typer.Option(False, "--cube", help="Also build its activation cube now (loads the model)."),
    model: str = typer.Option("smollm2", help="Model for --cube: local checkpoint folder or 'smollm2'."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Add a plaintext memory (optionally with its cube) to a store namespace; creates the store if needed."""
    if (text is None) == (file is None):
        raise typer.BadParameter("give the memory text as an argument or with --file, not both")
    if file is not None:
        text = _read_text(file)
    view = _view(store, namespace, [], create=True)
    rec = view.add(memory_id or view.mint_id(text), text)
    if cube:
        from .memory_model import wrap

        m, tok = _load_model(model, "float32")
        built = wrap(m, tok).build_cube(text, name=rec.id, progress=True)
        rec = view.put_cube(rec.id, built, text=text)
    typer.echo(f"added {rec.qualified}" + (f" with a {rec.tokens}-token cube ({rec.bytes / 1e6:.1f} MB)"
                                           if rec.kind == "memcube" else ""))


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
    from .index import MemoryIndex

    view = _view(store, namespace, shared)
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
):
    """List the memories a namespace can see."""
    for rec in _view(store, namespace, shared).ls():
        text = rec.text.replace("\n", " ")
        cube = f"cube {rec.tokens} tok {rec.bytes / 1e6:.1f} MB" if rec.kind == "memcube" else "text only"
        typer.echo(f"{rec.namespace}/{rec.id:<24} {cube:<24} hits {rec.hits:<4} {text[:60]}")


@app.command()
@_friendly
def rm(
    memory_id: str = typer.Argument(..., help="Memory id to delete (own namespace only)."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Delete a memory (and its cube) from a namespace."""
    if not _view(store, namespace, []).rm(memory_id):
        typer.echo(f"kvmem: no memory {memory_id!r} in namespace {namespace!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"removed {namespace}/{memory_id}")


@app.command()
@_friendly
def stats(
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
    shared: list[str] = SharedOpt,
):
    """Counts and sizes of what a namespace can see."""
    for key, value in _view(store, namespace, shared).stats().items():
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
    report = _store(store).gc(grace_s=grace)
    for name in report.removed:
        typer.echo(f"removed {name}")
    for name in report.swept:
        typer.echo(f"removed unfinished {name}")
    for qualified in report.repaired:
        typer.echo(f"repaired {qualified}: its cube file was missing; it is text-only now")
    typer.echo(f"gc: {len(report.removed) + len(report.swept)} files removed, {len(report.repaired)} memories "
               "repaired")


@app.command()
@_friendly
def repair(
    folder: Optional[str] = typer.Argument(None, help="Store folder (or give --store)."),
    store: Optional[str] = StoreOpt,
):
    """Rebuild a lost, emptied or damaged catalog from the store's cube files (the old catalog is moved aside).
    Memories without a cube file, grants and use counts lived only in the catalog and cannot come back."""
    from .store import CubeStore

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
    typer.echo(f"repair: {len(report.rebuilt) + len(report.recovered)} memories rebuilt from cube files, "
               f"{len(report.skipped)} files skipped (the next gc removes them). Not recoverable: {report.lost}")


@app.command()
@_friendly
def share(
    reader: str = typer.Argument(..., help="Namespace that may read (or '*' for every namespace)."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Let READER read the memories of --namespace (a recorded grant, revocable with `kvmem unshare`)."""
    _store(store).grant(namespace, reader)
    typer.echo(f"{reader} may read {namespace}'s memories (undo: kvmem unshare {reader} -n {namespace})")


@app.command()
@_friendly
def unshare(
    reader: str = typer.Argument(..., help="Namespace whose read access to --namespace ends."),
    store: Optional[str] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Withdraw READER's read access to the memories of --namespace."""
    if not _store(store).revoke(namespace, reader):
        typer.echo(f"kvmem: {namespace} had not shared with {reader}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{reader} may no longer read {namespace}'s memories")


@app.command()
@_friendly
def grants(store: Optional[str] = StoreOpt):
    """List the share grants of a store (owner -> reader)."""
    for owner, reader in _store(store).grants():
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
    from .memory_model import wrap

    view = _view(store, namespace, shared)
    m, tok = _load_model(model, dtype)
    options = {}
    if lexical:
        from .index import MemoryIndex

        options["index"] = MemoryIndex(dense=False)
    mm = wrap(m, tok).attach(view, **options)
    typer.echo(mm.answer(question, cubes="auto", max_new_tokens=max_new_tokens))
    last = mm.last
    used = ", ".join(f"{x.get('namespace')}/{x.get('id')} ({x.get('source')})" for x in last.memories) or "none"
    typer.echo(f"memories: {used}; TTFT {last.ttft_s * 1e3:.0f} ms", err=True)


def main():
    app(prog_name="kvmem")


if __name__ == "__main__":
    main()

"""The `kvmem` command: build, inspect and demo MemCubes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="kvmem: persistent memory (KV-cache MemCubes, LoRA AdapterCubes) for HuggingFace transformers.")

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _load_model(model: str, dtype: str, *, tokenizer: bool = True):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from .real_model import load_smollm2

    logging.set_verbosity_error()
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
    from .errors import CubeError

    if not text_file.is_file():
        raise typer.BadParameter(f"{text_file} is not a file")
    text = text_file.read_text(encoding="utf-8")
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
def build_adapter(
    peft_dir: Path = typer.Argument(..., help="PEFT LoRA adapter folder (adapter_config.json + safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", help="AdapterCube file to write (.safetensors)."),
    name: Optional[str] = typer.Option(None, help="Cube name (default: the folder name)."),
    model: str = typer.Option("smollm2", help="Base model: local checkpoint folder, or 'smollm2'."),
    dtype: str = typer.Option("float32", help="Base model dtype: float32, bfloat16 or float16."),
):
    """Package a PEFT LoRA adapter as an AdapterCube bound to its base model."""
    from .adapter import AdapterCube
    from .errors import CubeError

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
    from .errors import CubeError

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
    import os

    return os.environ.get("KVMEM_STORE") or str(Path.home() / ".kvmem" / "store")


StoreOpt = typer.Option(None, "--store", help="Store folder (default: $KVMEM_STORE or ~/.kvmem/store).")
NamespaceOpt = typer.Option("default", "--namespace", "-n", help="Namespace to read and write.")
SharedOpt = typer.Option([], "--shared", help="Namespaces shared with this one (read-only; repeatable).")


def _view(store: Optional[Path], namespace: str, shared: list[str]):
    from .errors import CubeError
    from .store import CubeStore

    try:
        return CubeStore(store or _default_store()).view(namespace, shared=shared)
    except CubeError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def add(
    text: Optional[str] = typer.Argument(None, help="Memory text (or use --file)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the memory text from this file."),
    memory_id: Optional[str] = typer.Option(None, "--id", help="Memory id (default: a hash of the text)."),
    cube: bool = typer.Option(False, "--cube", help="Also build its activation cube now (loads the model)."),
    model: str = typer.Option("smollm2", help="Model for --cube: local checkpoint folder or 'smollm2'."),
    store: Optional[Path] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Add a plaintext memory (optionally with its cube) to a store namespace."""
    from .errors import CubeError

    if (text is None) == (file is None):
        raise typer.BadParameter("give the memory text as an argument or with --file, not both")
    if file is not None:
        if not file.is_file():
            raise typer.BadParameter(f"{file} is not a file")
        text = file.read_text(encoding="utf-8")
    view = _view(store, namespace, [])
    try:
        rec = view.add(memory_id or view.mint_id(text), text)
        memory_id = rec.id
        if cube:
            from .memory_model import wrap

            m, tok = _load_model(model, "float32")
            built = wrap(m, tok).build_cube(text, name=memory_id, progress=True)
            rec = view.put_cube(memory_id, built, text=text)
    except CubeError as exc:
        typer.echo(f"kvmem: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(f"added {rec.namespace}/{rec.id}" + (f" with a {rec.tokens}-token cube ({rec.bytes / 1e6:.1f} MB)"
                                                   if rec.kind == "memcube" else ""))


@app.command()
def search(
    query: str = typer.Argument(..., help="What to look for."),
    k: int = typer.Option(5, "-k", min=1, help="How many results."),
    lexical: bool = typer.Option(False, "--lexical", help="BM25 only (no embedding model)."),
    store: Optional[Path] = StoreOpt,
    namespace: str = NamespaceOpt,
    shared: list[str] = SharedOpt,
):
    """Search the memories a namespace can see (own + shared), best first."""
    from .index import MemoryIndex

    view = _view(store, namespace, shared)
    index = MemoryIndex.from_store(view, dense=False if lexical else "auto")
    for memory_id, score in index.search(query, k=k):
        rec = view.get(memory_id)
        text = rec.text.replace("\n", " ")
        typer.echo(f"{score:7.3f}  {rec.namespace}/{memory_id}  {text[:90]}{'...' if len(text) > 90 else ''}")


@app.command("ls")
def ls_(
    store: Optional[Path] = StoreOpt,
    namespace: str = NamespaceOpt,
    shared: list[str] = SharedOpt,
):
    """List the memories a namespace can see."""
    view = _view(store, namespace, shared)
    for rec in view.ls():
        text = rec.text.replace("\n", " ")
        cube = f"cube {rec.tokens} tok {rec.bytes / 1e6:.1f} MB" if rec.kind == "memcube" else "text only"
        typer.echo(f"{rec.namespace}/{rec.id:<24} {cube:<24} hits {rec.hits:<4} {text[:60]}")


@app.command()
def rm(
    memory_id: str = typer.Argument(..., help="Memory id to delete (own namespace only)."),
    store: Optional[Path] = StoreOpt,
    namespace: str = NamespaceOpt,
):
    """Delete a memory (and its cube) from a namespace."""
    if not _view(store, namespace, []).rm(memory_id):
        typer.echo(f"kvmem: no memory {memory_id!r} in namespace {namespace!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"removed {namespace}/{memory_id}")


@app.command()
def stats(
    store: Optional[Path] = StoreOpt,
    namespace: str = NamespaceOpt,
    shared: list[str] = SharedOpt,
):
    """Counts and sizes of what a namespace can see."""
    for key, value in _view(store, namespace, shared).stats().items():
        typer.echo(f"{key:>12}  {value}")


def main():
    app()


if __name__ == "__main__":
    main()

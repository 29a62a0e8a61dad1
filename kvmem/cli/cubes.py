"""`kvmem build`, `build-adapter`, `inspect` and `demo`: cube files and the demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import CubeError
from .app import _friendly, _load_model, _read_text, app, writing


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
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Save the cube quantized: int8 or int4 "
                                           "(approximate; its measured error goes into the cube)."),
):
    """Turn a text file into a MemCube (its KV cache), with a progress bar for long texts."""
    from ..cubes.memcube import MemCube
    from ..memory_model import wrap

    if quantize not in (None, "int8", "int4"):
        raise typer.BadParameter(f"--quantize must be int8 or int4, got {quantize!r}")
    text = _read_text(text_file)
    m, tok = _load_model(model, dtype)
    with writing(out):
        if anchor is None and chat:
            anchor = wrap(m, tok).anchor
        cube = MemCube.from_text(m, tok, text, name=name or text_file.stem, anchor=anchor, progress=True)
        if quantize is not None:
            cube = cube.quantize(quantize)
        path = cube.save(out)
    typer.echo(f"wrote {path}: {cube.num_tokens} tokens (+{cube.anchor_len} anchor), {cube.nbytes / 1e6:.1f} MB, "
               f"fingerprint {cube.fingerprint}" + (f"; {quantize}: {_error_line(cube.quantization)}" if quantize else ""))


def _error_line(q: dict) -> str:
    """A quantized cube's measured error, in words (build and inspect show it)."""
    e = q["error"]
    return (f"{q['bytes'] / q['full_bytes']:.2f}x the {q['full_dtype'].replace('torch.', '')} bytes; next-token KL "
            f"mean {e['kl_mean']:.2g} / max {e['kl_max']:.2g} nats, greedy continuation unchanged on "
            f"{e['greedy_same']:.0%} of {e['probes']} probes of its own text (vs the full-width cube)")


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
    from ..cubes.adaptercube import AdapterCube

    m, _ = _load_model(model, dtype, tokenizer=False)
    with writing(out):
        cube = AdapterCube.from_peft(peft_dir, name=name, base_model=m)
        path = cube.save(out)
    typer.echo(f"wrote {path}: LoRA rank {cube.rank} on {', '.join(cube.target_modules)}, "
               f"{cube.nbytes / 1e6:.2f} MB, base fingerprint {cube.fingerprint}")


def _inspect_adapter(cube_file: Path, as_json: bool):
    from ..cubes.adaptercube import AdapterCube
    from ..travel.provenance import inspect_rows

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
        ("learned from", _sources(meta)),  # memories it was distilled from (lineage.usable_for checks them)
        *inspect_rows(meta),  # installed from a bundle: by whom, from where
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
    from ..cubes.format import peek_format
    from ..cubes.memcube import MemCube
    from ..travel.provenance import inspect_rows

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
        ("quantized", f"{meta['quantization']['scheme']}: {_error_line(meta['quantization'])}"
                      if meta.get("quantization") else "no (full width, exact)"),
        ("fingerprint", cube.fingerprint),
        ("model", f"{model.get('model_type')} {model.get('architectures')}, {model.get('num_hidden_layers')} layers, "
                  f"hidden {model.get('hidden_size')}"),
        ("weights", meta["fingerprint_fields"]["weights"]),
        ("tokenizer", meta["fingerprint_fields"].get("tokenizer") or "(not recorded)"),
        ("adapter", json.dumps(adapter) if adapter else "none"),
        ("created", f"{meta.get('created')} by kvmem {meta.get('kvmem_version')}"),
        ("derived from", _sources(meta)),  # what forgetting checks (kvmem/store/lineage.py)
        *inspect_rows(meta),  # where a store's cube came from (installed from a bundle, migrated)
    ])


def _sources(meta: dict) -> str:
    entries = meta.get("derived_from") or []
    return ", ".join(f"{e.get('memory')} (text sha256 {str(e.get('text_sha256'))[:12]})" for e in entries
                     if isinstance(e, dict)) or "(no store memory recorded)"


@app.command()
@_friendly
def demo(
    question: str = typer.Option("Where does Pavel live?", help="Question about the bundled team notes."),
    max_new_tokens: int = typer.Option(24, min=1, help="Tokens to generate per answer."),
    repeats: int = typer.Option(3, min=1, help="TTFT samples per method (median is shown)."),
):
    """The main job: real model, real cube from disk, both answers and the TTFT saving."""
    from ..demo.run import run_demo

    run_demo(question=question, max_new_tokens=max_new_tokens, repeats=repeats, echo=typer.echo)



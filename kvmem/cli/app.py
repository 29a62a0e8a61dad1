"""The `kvmem` command's app and what every command group shares: error handling, model loading, the store options.

Fast to start: nothing heavy (torch, transformers) is imported until a command needs it, and transformers'
progress bars and logs stay out of the output. A `CubeError` anywhere ends the command with its one-line
message and exit status 1, not a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import CubeError

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


@contextlib.contextmanager
def writing(out):
    """Saving a file to ``out``: an OSError (a full disk, a read-only folder) becomes one ``kvmem:`` line and exit
    status 1; kvmem's saves are atomic, so nothing half-written is left behind."""
    try:
        yield
    except OSError as exc:
        why = f"cannot write {out} ({exc.strerror})" if exc.strerror else str(exc)
        typer.echo(f"kvmem: {why}: check free space and write access", err=True)
        raise typer.Exit(1) from None


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

    from ..demo.models import load_smollm2

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



def _default_store() -> str:
    return os.environ.get("KVMEM_STORE") or str(Path.home() / ".kvmem" / "store")


StoreOpt = typer.Option(None, "--store", help="Store folder or redis:// URL (default: $KVMEM_STORE or ~/.kvmem/store).")
NamespaceOpt = typer.Option("default", "--namespace", "-n", help="Namespace to read and write.")
SharedOpt = typer.Option([], "--shared", help="Namespaces that shared with this one (read-only; repeatable).")


def open_store(store: Optional[str], *, create: bool = False):
    """The store at ``--store``; only commands that write create one (a mistyped path is an error)."""
    from ..store.cubestore import CubeStore

    location = str(store) if store is not None else _default_store()
    return CubeStore(location if location.startswith(("redis://", "rediss://", "unix://"))
                     else Path(location).expanduser(), create=create)


def open_view(store: Optional[str], namespace: str, shared: list[str], *, create: bool = False):
    return open_store(store, create=create).view(namespace, shared=shared)


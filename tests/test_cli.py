"""The `kvmem` command line: build a cube from a text file, inspect good and bad cubes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import kvmem
from helpers import tiny_model
from kvmem.cli import app

runner = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1"})  # wide: rich must not wrap messages


def test_build_then_inspect(checkpoint, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("Alice lives in Oslo. Bob lives in Lisbon.\n", encoding="utf-8")
    out = tmp_path / "notes.safetensors"
    result = runner.invoke(app, ["build", str(notes), "-o", str(out), "--model", str(checkpoint)])
    assert result.exit_code == 0, result.output
    cube = kvmem.MemCube.load(out)
    assert cube.name == "notes" and cube.text == notes.read_text(encoding="utf-8")
    assert cube.anchor == "<|im_start|>system\n"  # --chat is the default: ready for kvmem.wrap
    assert f"{cube.num_tokens} tokens" in result.output

    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert cube.fingerprint in shown.output and "valid" in shown.output and "notes" in shown.output
    as_json = runner.invoke(app, ["inspect", str(out), "--json"])
    meta = json.loads(as_json.output)
    assert meta["valid"] is True and meta["num_tokens"] == cube.num_tokens


def test_inspect_reports_corruption(checkpoint, tmp_path):
    notes = tmp_path / "n.txt"
    notes.write_text("Some memory text.", encoding="utf-8")
    out = tmp_path / "n.safetensors"
    assert runner.invoke(app, ["build", str(notes), "-o", str(out), "--model", str(checkpoint), "--no-chat"]).exit_code == 0
    data = bytearray(out.read_bytes())
    data[-5] ^= 0x10
    out.write_bytes(bytes(data))
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 1
    assert "INVALID" in result.output and "checksum" in result.output


def test_build_rejects_missing_inputs(tmp_path):
    result = runner.invoke(app, ["build", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code != 0 and "not a file" in result.output
    (tmp_path / "t.txt").write_text("x")
    result = runner.invoke(app, ["build", str(tmp_path / "t.txt"), "-o", str(tmp_path / "x.safetensors"),
                                 "--model", str(tmp_path / "no-model")])
    assert result.exit_code != 0 and "kvmem never downloads" in result.output


def test_build_adapter_then_inspect(checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                        ).save_pretrained(tmp_path / "lora")
    out = tmp_path / "lora.safetensors"
    result = runner.invoke(app, ["build-adapter", str(tmp_path / "lora"), "-o", str(out), "--model", str(checkpoint)])
    assert result.exit_code == 0, result.output
    cube = kvmem.AdapterCube.load(out)
    assert cube.rank == 4 and cube.name == "lora" and "rank 4" in result.output
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "AdapterCube" in shown.output and cube.fingerprint in shown.output

    other = tmp_path / "other"
    tiny_model("llama", hidden_size=32, head_dim=8).save_pretrained(other)
    refused = runner.invoke(app, ["build-adapter", str(tmp_path / "lora"), "-o", str(tmp_path / "x.safetensors"),
                                  "--model", str(other)])
    assert refused.exit_code == 1 and "another model size" in refused.output


def test_store_commands(tmp_path):
    store = ["--store", str(tmp_path / "store")]
    assert runner.invoke(app, ["add", "Alice moved to Oslo.", "--id", "a1", "-n", "alice", *store]).exit_code == 0
    assert runner.invoke(app, ["add", "Bob has a parrot.", "--id", "b1", "-n", "bob", *store]).exit_code == 0
    (tmp_path / "faq.txt").write_text("The office opens at nine.")
    assert runner.invoke(app, ["add", "--file", str(tmp_path / "faq.txt"), "--id", "faq", "-n", "public", *store]
                         ).exit_code == 0
    assert runner.invoke(app, ["share", "alice", "-n", "public", *store]).exit_code == 0  # an explicit grant
    listed = runner.invoke(app, ["ls", "-n", "alice", "--shared", "public", *store]).output
    assert "alice/a1" in listed and "public/faq" in listed and "b1" not in listed
    found = runner.invoke(app, ["search", "Oslo", "--lexical", "-n", "alice", *store]).output
    assert found.splitlines()[0].split()[1] == "alice/a1" and "parrot" not in found
    assert "parrot" not in runner.invoke(app, ["search", "parrot", "--lexical", "-n", "alice", *store]).output
    assert "memories  1" in runner.invoke(app, ["stats", "-n", "bob", *store]).output
    assert runner.invoke(app, ["rm", "b1", "-n", "alice", *store]).exit_code == 1  # not alice's to delete
    assert runner.invoke(app, ["rm", "b1", "-n", "bob", *store]).exit_code == 0
    assert "memories  0" in runner.invoke(app, ["stats", "-n", "bob", *store]).output
    bad = runner.invoke(app, ["ls", "-n", "../etc", *store])
    assert bad.exit_code != 0 and "namespace" in bad.output

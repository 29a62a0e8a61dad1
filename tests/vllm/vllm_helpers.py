"""Plain helpers for the vLLM tests (fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

NOTES = Path(__file__).resolve().parents[2] / "kvmem" / "demo" / "data" / "team_notes.txt"  # the memory text


def foreign_cube(model, tok, like):
    """A cube of ``like``'s ids built by another model: a fine-tuned copy (other weights, same architecture)."""
    import torch

    import kvmem

    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        saved = emb.clone()
        emb.mul_(1.01)
        try:
            return kvmem.MemCube.from_ids(model, like.input_ids, name="foreign", anchor_ids=like.anchor_ids,
                                          tokenizer=tok)
        finally:
            emb.copy_(saved)


def corrupt_bytes(data: bytes) -> bytes:
    """A cube file's bytes with a few payload bytes flipped (same header and ids: only the checksum tells)."""
    raw = bytearray(data)
    for i in range(len(raw) - 64, len(raw) - 32):
        raw[i] ^= 0xFF
    return bytes(raw)


# ---------------------------------------------------------------- an offline engine (LLM(), one process)
def offline_engine(ckpt, extra: dict, *, role: str = "kv_consumer", max_model_len: int = 1024):
    """vLLM's offline ``LLM`` on ``ckpt`` (float32, eager, seed 0) with KvmemConnector configured by ``extra``
    (``kv_connector_extra_config``), ``kv_load_failure_policy="recompute"``: the engine every offline test uses."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    return LLM(model=str(ckpt), dtype="float32", enforce_eager=True, max_model_len=max_model_len, seed=0,
               kv_transfer_config=KVTransferConfig(
                   kv_connector="KvmemConnector", kv_connector_module_path="kvmem.integrations.vllm",
                   kv_role=role, kv_load_failure_policy="recompute", kv_connector_extra_config=extra))


def run_request(llm, ids, kvmem_params=None, *, salt: str | None = "fresh", max_new: int = 10):
    """(greedy token ids, logprobs of them, num_cached_tokens) of one request to ``llm``. ``salt="fresh"``: a
    unique cache salt, so the request never reads blocks another request left in vLLM's prefix cache."""
    import uuid

    import torch
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"kvmem": kvmem_params}} if kvmem_params is not None else None
    params = SamplingParams(max_tokens=max_new, temperature=0.0, logprobs=0, extra_args=extra)
    prompt = {"prompt_token_ids": list(ids)}
    if salt is not None:
        prompt["cache_salt"] = uuid.uuid4().hex if salt == "fresh" else salt
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    tokens = list(out.outputs[0].token_ids)
    logprobs = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)]
    return tokens, torch.tensor(logprobs), out.num_cached_tokens


def wait_for(path, timeout: float = 120.0):
    """The cube file an engine's background writer publishes (atomically) once the request is done, loaded."""
    import time

    import kvmem

    deadline = time.time() + timeout
    while not path.is_file():
        assert time.time() < deadline, f"{path} was not written in {timeout} s"
        time.sleep(0.2)
    return kvmem.MemCube.load(path)


# ---------------------------------------------------------------- vLLM's OpenAI server
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connector_config(extra: dict, *, role: str = "kv_consumer") -> str:
    import json

    return json.dumps({"kv_connector": "KvmemConnector", "kv_connector_module_path": "kvmem.integrations.vllm",
                       "kv_role": role, "kv_load_failure_policy": "recompute",
                       "kv_connector_extra_config": extra})


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 and a free port, its output in a log file.

    Started in its own process group and stopped by that id (SIGTERM, then SIGKILL)."""

    def __init__(self, ckpt, extra: dict, log_path, *, max_model_len: int = 1024, role: str = "kv_consumer",
                 env: dict | None = None):
        import os
        import subprocess
        import sys

        self.port, self.log_path, self.ckpt = free_port(), log_path, str(ckpt)
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {}))
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's engine core runs in its own process
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.ckpt, "--host", "127.0.0.1",
             "--port", str(self.port), "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len),
             "--enable-prompt-tokens-details", "--kv-transfer-config", connector_config(extra, role=role)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 900) -> "Server":
        import time
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited ({self.proc.returncode}):\n{self.text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"the vLLM server did not become ready in {timeout} s:\n{self.text()[-3000:]}")

    def complete(self, body: dict) -> dict:
        import json
        import urllib.request

        body = {"model": self.ckpt, "max_tokens": 10, "temperature": 0.0, **body}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def text(self) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # the engine core, if it outlived the server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()

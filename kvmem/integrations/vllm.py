"""kvmem in vLLM: `KvmemConnector`, a v1 KV connector that loads MemCubes into vLLM's paged KV cache.

Enable it on any vLLM entry point, no vLLM code changed (``pip install 'kvmem[vllm]'``; docs/serving-vllm.md)::

    python -m vllm.entrypoints.openai.api_server --model CKPT --dtype float32 --kv-transfer-config \\
      '{"kv_connector": "KvmemConnector", "kv_connector_module_path": "kvmem.integrations.vllm",
        "kv_role": "kv_consumer", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"store": "redis://127.0.0.1:6379/0", "namespace": "default"}}'

Extra config: ``store`` (kvmem store folder or ``redis://`` URL) or ``folder`` (``<folder>/<namespace>/<name>
.safetensors``); ``namespace`` (for requests that name none, default "default"); ``namespaces`` (those requests
may name, default only ``namespace``); ``auto`` (default true: plain requests get the longest exact cube whose
ids start their prompt).

A request names cubes in ``kv_transfer_params`` (``SamplingParams(extra_args={"kv_transfer_params": ...})`` in
Python, a ``kv_transfer_params`` field in the OpenAI request body)::

    {"kvmem": {"cubes": ["notes", "faq"], "namespace": "alice"}}

The scheduler side plans each request when it arrives (`CubePlanner`: validation, fingerprint, prefix check,
composition) and gives an approximate prefix a cache salt before vLLM hashes its blocks; the worker side writes
the plan's KV through the attention backend's own ``do_kv_cache_update``. Anything wrong with a request's cubes is
logged and the request is prefilled as if kvmem were not there; a failed write is reported to vLLM as a load
error, which ``kv_load_failure_policy="recompute"`` recomputes.

The KV-connector API is marked experimental by vLLM: this module is tested against the version the ``vllm``
extra pins.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from ..errors import CubeError
from .serving import CubePlanner, CubeSource, Plan, check_connector_options, served_model_facts

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger("vllm.kvmem")

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass
class _Load:
    """One request's KV to write this step: positions [start, start + n) of the plan, at ``slots``."""

    request_id: str
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [n, kv_heads, head_dim]
    slots: torch.Tensor                          # [n] int64: block_id * block_size + offset
    block_ids: list[int]


@dataclass
class KvmemConnectorMetadata(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)


def layer_index(layer_name: str) -> int:
    """The decoder layer number in a vLLM attention layer name (``model.layers.7.self_attn.attn`` -> 7)."""
    m = _LAYER_INDEX.search(layer_name)
    if m is None:
        raise CubeError(f"cannot tell the layer number of attention layer {layer_name!r}")
    return int(m.group(1))


class KvmemConnector(KVConnectorBase_V1):
    """Serves kvmem MemCubes as vLLM prefix KV (see the module docstring for configuration and requests)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._plans: dict[str, Plan] = {}      # scheduler: request id -> its plan, until it finishes
        self._pending: list[_Load] = []        # scheduler: loads for the next build_connector_meta
        self._load_errors: set[int] = set()    # worker: blocks whose write failed
        self.planner: CubePlanner | None = None
        if role == KVConnectorRole.SCHEDULER:
            groups = len(getattr(kv_cache_config, "kv_cache_groups", None) or [None])
            if groups == 1:
                self.planner = self._make_planner(vllm_config)
            else:  # hybrid models (sliding-window groups, Mamba) keep several block tables: not handled yet
                logger.warning("kvmem: this model has %d KV cache groups; KvmemConnector serves models with one "
                               "only, so every request is prefilled normally", groups)

    # ---------------------------------------------------------------- scheduler side
    def _make_planner(self, vllm_config) -> CubePlanner:
        extra = check_connector_options(self._kv_transfer_config.kv_connector_extra_config or {})
        model_config = vllm_config.model_config
        source = CubeSource(store=extra.get("store"), folder=extra.get("folder"))
        t0 = time.perf_counter()
        # the served checkpoint's fingerprint, once: config, tokenizer and weights as transformers reads them
        fields, rope = served_model_facts(model_config.model, tokenizer=model_config.tokenizer)
        namespace = extra.get("namespace", "default")
        planner = CubePlanner(source, fields=fields, dtype=model_config.dtype, block_size=self._block_size,
                              rope=rope, namespace=namespace, namespaces=extra.get("namespaces"),
                              auto=extra.get("auto", True))
        logger.info("kvmem: serving cubes from %r, namespaces %s (default %r), serving dtype %s, block size %d; "
                    "fingerprint of %s taken in %.1f s", source, list(planner.namespaces), namespace,
                    model_config.dtype, self._block_size, model_config.model, time.perf_counter() - t0)
        return planner

    def on_new_request(self, request: "Request") -> None:
        """Plan the request as it arrives, before vLLM looks up its prefix cache: an approximate prefix gets its
        cache salt now, so its blocks are hashed apart from the same plain tokens."""
        if self.planner is None:
            return
        t0 = time.perf_counter()
        try:
            plan = self.planner.plan(request.prompt_token_ids or [], request.kv_transfer_params,
                                     salt=request.cache_salt)
        except CubeError as exc:
            logger.warning("kvmem: request %s is prefilled without cubes: %s", request.request_id, exc)
            return
        except Exception as exc:  # never take the server down over a cube
            logger.exception("kvmem: request %s is prefilled without cubes: unexpected %s: %s",
                             request.request_id, type(exc).__name__, exc)
            return
        if plan is None:
            return
        if plan.salt is not None:
            request.cache_salt = plan.salt
            request.block_hashes.clear()
            request.update_block_hashes()
        self._plans[request.request_id] = plan
        logger.info("kvmem: request %s gets %s from namespace %r: %d tokens%s, planned in %.0f ms",
                    request.request_id, list(plan.names), plan.namespace, plan.num_tokens,
                    "" if plan.exact else f" (approximate: {'; '.join(plan.notes)}; cache salt {plan.salt})",
                    1e3 * (time.perf_counter() - t0))

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        plan = self._plans.get(request.request_id)
        if plan is None or plan.num_tokens <= num_computed_tokens:
            return 0, False
        return plan.num_tokens - num_computed_tokens, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens <= 0:
            return
        plan = self._plans.get(request.request_id)
        if plan is None:
            return
        start, end = plan.num_tokens - num_external_tokens, plan.num_tokens
        block_ids = list(blocks.get_block_ids()[0])
        bs = self._block_size
        pos = torch.arange(start, end)
        table = torch.as_tensor(block_ids, dtype=torch.long)
        slots = table[pos // bs] * bs + pos % bs
        kv = [(k[:, start:end].transpose(0, 1).contiguous(), v[:, start:end].transpose(0, 1).contiguous())
              for k, v in plan.kv]
        self._pending.append(_Load(request.request_id, kv, slots, block_ids[start // bs:(end + bs - 1) // bs]))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvmemConnectorMetadata(loads=self._pending)
        self._pending = []
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._plans.pop(request.request_id, None)
        return False, None

    # ---------------------------------------------------------------- worker side
    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Write each planned request's KV into every attention layer, through the backend's own cache op."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvmemConnectorMetadata) or not meta.loads:
            return
        layers = [(name, layer) for name, layer in forward_context.no_compile_layers.items()
                  if getattr(layer, "kv_cache", None) is not None and hasattr(getattr(layer, "impl", None),
                                                                              "do_kv_cache_update")]
        for load in meta.loads:
            try:
                for name, layer in layers:
                    kv_cache = layer.kv_cache
                    k, v = load.kv[layer_index(name)]
                    slots = load.slots.to(kv_cache.device)
                    layer.impl.do_kv_cache_update(layer, k.to(kv_cache.device, kv_cache.dtype),
                                                  v.to(kv_cache.device, kv_cache.dtype), kv_cache, slots)
            except Exception as exc:  # a failed write must not serve garbage: vLLM recomputes these blocks
                logger.exception("kvmem: writing the KV of request %s failed (%s: %s); its blocks are reported "
                                 "as load errors", load.request_id, type(exc).__name__, exc)
                self._load_errors.update(load.block_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # kvmem cubes are built by kvmem, not saved from the engine

    def wait_for_save(self):
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

"""kvmem in vLLM: `KvmemConnector`, a v1 KV connector that loads MemCubes into vLLM's paged KV cache.

Enable it on any vLLM entry point, no vLLM code changed (``pip install 'kvmem[vllm]'``; docs/serving-vllm.md)::

    python -m vllm.entrypoints.openai.api_server --model CKPT --dtype float32 --kv-transfer-config \\
      '{"kv_connector": "KvmemConnector", "kv_connector_module_path": "kvmem.integrations.vllm",
        "kv_role": "kv_consumer", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"store": "redis://127.0.0.1:6379/0", "namespace": "default"}}'

Extra config: ``store`` (kvmem store folder or ``redis://`` URL) or ``folder`` (``<folder>/<namespace>/<name>
.safetensors``); ``namespace`` (for requests that name none, default "default"); ``namespaces`` (those requests
may name, default only ``namespace``); ``auto`` (default true: plain requests get the longest exact cube whose
ids start their prompt); ``tenant_salt`` (default true: every request's prefix-cache blocks are keyed by its
namespace, `kvmem.integrations.tenancy`) and ``salt_secret`` (default ``$KVMEM_SALT_SECRET`` or random per start;
``"env:NAME"`` / ``"file:PATH"``; replicas behind a prefix-aware router share one); ``layerwise`` (default
true: a loader thread writes cube KV layer by layer while earlier layers compute; false: all layers before the
forward pass); ``loader_cpus`` (default "auto": the loading and saving threads run on the worker's CPUs that vLLM
bound no forward thread to, `kvmem.integrations.cpu_affinity`).

A request names cubes in ``kv_transfer_params`` (``SamplingParams(extra_args={"kv_transfer_params": ...})`` in
Python, a ``kv_transfer_params`` field in the OpenAI request body)::

    {"kvmem": {"cubes": ["notes", "faq"], "namespace": "alice"}}
    {"kvmem": {"save": "notes", "namespace": "alice", "text": "...", "tokens": 300, "anchor": 12}}

The second asks the server to keep the prompt's computed KV as cube ``notes`` (``kv_role`` ``kv_both``;
`kvmem.integrations.saving`): the worker copies it out of the paged cache after the forward pass
(`kvmem.integrations.vllm_pages`) and a background thread validates and writes the cube.

The scheduler side plans each request when it arrives (`CubePlanner`: validation, fingerprint, prefix check,
composition) and gives an approximate prefix a cache salt before vLLM hashes its blocks; the worker side writes
the plan's KV through the attention backend's own ``do_kv_cache_update`` (or by plain copies where that op's
placement is rows / columns per head, `kvmem.integrations.vllm_pages.BlockPlacement`). Anything wrong with a
request's cubes is logged and the request is prefilled as if kvmem were not there; a failed write is reported to
vLLM as a load error, which ``kv_load_failure_policy="recompute"`` recomputes.

The KV-connector API is marked experimental by vLLM: this module is tested against the version the ``vllm``
extra pins.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
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
from .saving import AutoSave, SaveSpec, build_cube, parse_save, write_cube
from .serving import CubePlanner, CubeSource, FileKV, Plan, check_connector_options, served_model_facts
from .tenancy import Tenancy, read_secret, request_namespace
from .vllm_metrics import Counts, KvmemPromMetrics, KvmemStats, refusal_reason
from .cpu_affinity import connector_cpus, describe, pin_thread
from .paged_layout import PagedLayout
from .vllm_pages import LayerWriter, Load

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
class _Save:
    """One request's prompt KV to copy out this step: ``spec``'s tokens, held in ``block_ids``."""

    request_id: str
    spec: SaveSpec
    block_ids: list[int]
    fields: dict  # the served checkpoint's fingerprint fields


@dataclass
class KvmemConnectorMetadata(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)
    saves: list[_Save] = field(default_factory=list)


def layer_index(layer_name: str) -> int:
    """The decoder layer number in a vLLM attention layer name (``model.layers.7.self_attn.attn`` -> 7)."""
    m = _LAYER_INDEX.search(layer_name)
    if m is None:
        raise CubeError(f"cannot tell the layer number of attention layer {layer_name!r}")
    return int(m.group(1))


class KvmemConnector(KVConnectorBase_V1):
    """Serves kvmem MemCubes as vLLM prefix KV, keys prefix-cache blocks by tenant, and saves cubes on request
    (see the module docstring for configuration and requests)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._extra = check_connector_options(self._kv_transfer_config.kv_connector_extra_config or {})
        self._plans: dict[str, Plan] = {}      # scheduler: request id -> its plan, until it finishes
        self._pending: list[Load] = []        # scheduler: loads for the next build_connector_meta
        self._saves: dict[str, SaveSpec] = {}  # scheduler: request id -> its save, until its prompt is computed
        self._save_blocks: dict[str, list[int]] = {}
        self._load_errors: set[int] = set()    # worker: blocks whose write failed
        self._collected: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # worker: saves, per layer
        self._layouts: dict[tuple, PagedLayout] = {}
        self._writer: ThreadPoolExecutor | None = None
        # the CPUs the loading and saving threads run on (checked on both sides: a bad value fails at start-up)
        self._cpus = connector_cpus(self._extra.get("loader_cpus", "auto"))
        if role == KVConnectorRole.WORKER:
            logger.info("kvmem: %s", describe(self._cpus))
        self._layers_writer = LayerWriter(layerwise=self._extra.get("layerwise", True),  # worker: cube KV in
                                          block_size=self._block_size, readers=self._extra.get("read_threads", 1),
                                          cpus=self._cpus)
        self._counts = Counts()  # this side's counters for vLLM's /metrics (kvmem.integrations.vllm_metrics)
        self._autosave = None
        if self._extra.get("autosave_tokens") is not None:
            self._autosave = AutoSave(tokens=self._extra["autosave_tokens"], capacity=self._extra.get("autosave_bytes"),
                                      block_size=self._block_size)
        self._salted: set[str] = set()
        self._source: CubeSource | None = None
        self.planner: CubePlanner | None = None
        self.tenancy: Tenancy | None = None
        self._tokenizer = None
        if role == KVConnectorRole.SCHEDULER:
            self._namespace = self._extra.get("namespace", "default")
            self._namespaces = CubePlanner.served_namespaces(self._namespace, self._extra.get("namespaces"))
            secret, where = read_secret(self._extra.get("salt_secret"))
            self.tenancy = Tenancy(secret, enabled=self._extra.get("tenant_salt", True))
            logger.info("kvmem: prefix-cache blocks %s (salt secret: %s)", "keyed by namespace" if
                        self.tenancy.enabled else "NOT keyed by namespace (tenant_salt is false)", where)
            groups = len(getattr(kv_cache_config, "kv_cache_groups", None) or [None])
            if groups == 1:
                self.planner = self._make_planner(vllm_config)
            else:
                # several block tables (the hybrid KV cache manager's sliding-window groups, Mamba): not handled.
                # vLLM 0.32 turns that manager off for a connector without SupportsHMA (this one), so a sliding-window
                # model such as Gemma 3 keeps every token on every layer in one group and is served above.
                logger.warning("kvmem: this model has %d KV cache groups; KvmemConnector serves models with one "
                               "only, so every request is prefilled normally", groups)

    # ---------------------------------------------------------------- scheduler side
    def _make_planner(self, vllm_config) -> CubePlanner:
        from transformers import AutoTokenizer

        extra = self._extra
        model_config = vllm_config.model_config
        # a Redis replica fetches its local copy of a cube once the request that read it is done (request_finished)
        source = CubeSource(store=extra.get("store"), folder=extra.get("folder"), defer_fetches=True)
        t0 = time.perf_counter()
        # the served checkpoint's fingerprint, once: config, tokenizer and weights as transformers reads them
        fields, rope = served_model_facts(model_config.model, tokenizer=model_config.tokenizer)
        self._tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer or model_config.model)
        planner = CubePlanner(source, fields=fields, dtype=model_config.dtype, block_size=self._block_size,
                              rope=rope, namespace=self._namespace, namespaces=list(self._namespaces),
                              auto=extra.get("auto", True), key_blocks=extra.get("key_blocks", True))
        logger.info("kvmem: serving cubes from %r, namespaces %s (default %r), serving dtype %s, block size %d; "
                    "fingerprint of %s taken in %.1f s", source, list(planner.namespaces), self._namespace,
                    model_config.dtype, self._block_size, model_config.model, time.perf_counter() - t0)
        return planner

    def on_new_request(self, request: "Request") -> None:
        """Plan the request as it arrives, before vLLM looks up its prefix cache, and give it its cache salt now:
        its namespace's (with its cubes' digests), or, for an approximate prefix, at least one of its own."""
        plan = self._plan(request)
        if self.tenancy is None:
            return
        own_salt = request.cache_salt
        if self.tenancy.enabled:
            spec = request.kv_transfer_params.get("kvmem") if isinstance(request.kv_transfer_params, dict) else None
            try:
                namespace = request_namespace(spec, default=self._namespace, served=self._namespaces)
            except CubeError:
                namespace = None  # a namespace not served here: a salt shared with nothing
            salt = self.tenancy.salt(namespace, digests=plan.digests if plan else (),
                                     composition=plan.salt if plan else None, request_salt=own_salt)
            self._counts.count("vllm:kvmem_salted_requests_total")
            if namespace is not None and namespace not in self._salted:
                self._salted.add(namespace)
                self._counts.gauge("vllm:kvmem_salted_namespaces", len(self._salted))
        else:
            salt = plan.salt if plan is not None else None
        if salt is not None and salt != own_salt:
            request.cache_salt = salt
            request.block_hashes.clear()
            request.update_block_hashes()
        self._plan_save(request, plan)

    def _plan(self, request: "Request") -> Plan | None:
        if self.planner is None:
            return None
        t0 = time.perf_counter()
        source = self.planner.source
        loads, read = source.loads, source.bytes_read
        try:
            plan = self.planner.plan(request.prompt_token_ids or [], request.kv_transfer_params,
                                     salt=request.cache_salt)
        except CubeError as exc:
            logger.warning("kvmem: request %s is prefilled without cubes: %s", request.request_id, exc)
            self._counts.count("vllm:kvmem_refusals_total", refusal_reason(str(exc)))
            return None
        except Exception as exc:  # never take the server down over a cube
            logger.exception("kvmem: request %s is prefilled without cubes: unexpected %s: %s",
                             request.request_id, type(exc).__name__, exc)
            self._counts.count("vllm:kvmem_refusals_total", "unexpected")
            return None
        finally:
            if source.loads > loads:
                self._counts.count("vllm:kvmem_cube_loads_total", n=source.loads - loads)
                self._counts.count("vllm:kvmem_cube_bytes_read_total", n=source.bytes_read - read)
        if plan is None:
            return None
        self._counts.count("vllm:kvmem_cubes_served_total", "exact" if plan.exact else "approximate")
        self._plans[request.request_id] = plan
        logger.info("kvmem: request %s gets %s from namespace %r: %d tokens%s%s, planned in %.0f ms",
                    request.request_id, list(plan.names), plan.namespace, plan.num_tokens,
                    "" if plan.exact else f" (approximate: {'; '.join(plan.notes)}; cache salt {plan.salt})",
                    ", keys from its key blocks" if getattr(plan.kv, "key_blocks", None) is not None else "",
                    1e3 * (time.perf_counter() - t0))
        return plan

    def _plan_save(self, request: "Request", plan: Plan | None) -> None:
        """Note the save a request asks for; refusals are logged and the request is served all the same."""
        params = request.kv_transfer_params
        spec = params.get("kvmem") if isinstance(params, dict) else None
        if not isinstance(spec, dict) or spec.get("save") is None:
            self._plan_autosave(request, plan, spec)
            return
        why = None
        if not self._kv_transfer_config.is_kv_producer:
            why = 'this server does not save cubes: start the connector with "kv_role": "kv_both"'
        elif self.planner is None:
            why = "this model's KV cache has several groups: kvmem saves cubes of single-group models only"
        elif plan is not None and not plan.exact:
            why = "the request's prefix is approximate (composed, precomposed or cast): its KV is not a cube's"
        else:
            try:
                save = parse_save(spec, request.prompt_token_ids or [], default=self._namespace,
                                  served=self._namespaces, tokenizer=self._tokenizer)
            except CubeError as exc:
                why = str(exc)
        if why is not None:
            logger.warning("kvmem: request %s is served, but its cube is not saved: %s", request.request_id, why)
            self._counts.count("vllm:kvmem_cubes_saved_total", "refused")
            return
        self._saves[request.request_id] = save
        logger.info("kvmem: request %s will save %d tokens as cube %r in namespace %r", request.request_id,
                    save.tokens, save.name, save.namespace)

    def _plan_autosave(self, request: "Request", plan: Plan | None, spec) -> None:
        if (self._autosave is None or self.planner is None or not self._kv_transfer_config.is_kv_producer
                or (plan is not None and not plan.exact)):
            return
        try:
            namespace = request_namespace(spec, default=self._namespace, served=self._namespaces)
            save = self._autosave.spec(request.prompt_token_ids or [], namespace, tokenizer=self._tokenizer,
                                       exists=lambda ns, name: name in self.planner.source.versions(ns))
        except CubeError as exc:
            logger.warning("kvmem: request %s is not auto-saved: %s", request.request_id, exc)
            return
        if save is not None and (plan is None or plan.num_tokens < save.tokens):
            self._saves[request.request_id] = save

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
        if isinstance(plan.kv, FileKV):  # still in its file: each layer is read when the loader writes it
            kv = plan.kv.window(start, end)
        else:  # views: each layer is copied as it is written
            kv = [(k[:, start:end], v[:, start:end]) for k, v in plan.kv]
        self._pending.append(Load(request.request_id, kv, slots, block_ids[start // bs:(end + bs - 1) // bs]))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvmemConnectorMetadata(loads=self._pending, saves=self._due_saves(scheduler_output))
        self._pending = []
        return meta

    def _due_saves(self, out: "SchedulerOutput") -> list[_Save]:
        """The saves whose tokens are all computed by the end of this step (their blocks tracked until then)."""
        if not self._saves:
            return []
        done = {}
        for new in out.scheduled_new_reqs:
            if new.req_id in self._saves:
                self._save_blocks[new.req_id] = list(new.block_ids[0])
                done[new.req_id] = new.num_computed_tokens + out.num_scheduled_tokens.get(new.req_id, 0)
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if rid in self._saves:
                blocks = cached.new_block_ids[i]
                if blocks is not None:
                    if rid in cached.resumed_req_ids or rid not in self._save_blocks:
                        self._save_blocks[rid] = list(blocks[0])
                    else:
                        self._save_blocks[rid].extend(blocks[0])
                done[rid] = cached.num_computed_tokens[i] + out.num_scheduled_tokens.get(rid, 0)
        due = []
        for rid, computed in done.items():
            spec = self._saves[rid]
            if computed >= spec.tokens:
                need = -(-spec.tokens // self._block_size)
                due.append(_Save(rid, spec, self._save_blocks.pop(rid)[:need], self.planner.fields))
                del self._saves[rid]
        return due

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.planner is not None:  # local copies of cubes read from Redis: fetched now, not during a forward pass
            self.planner.source.start_fetches()
        self._plans.pop(request.request_id, None)
        self._save_blocks.pop(request.request_id, None)
        if self._saves.pop(request.request_id, None) is not None:
            logger.warning("kvmem: request %s finished before its prompt was computed: its cube is not saved",
                           request.request_id)
        return False, None

    # ---------------------------------------------------------------- worker side
    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Start writing each planned request's KV, layer by layer in model order, through the backend's own cache
        op (`kvmem.integrations.vllm_pages.LayerWriter`): layer i's write runs while earlier layers compute."""
        meta = self._get_connector_metadata()
        self._finish_loads()
        if not isinstance(meta, KvmemConnectorMetadata) or not meta.loads:
            return
        layers = sorted(((layer_index(name), name, layer) for name, layer in forward_context.no_compile_layers.items()
                         if getattr(layer, "kv_cache", None) is not None
                         and hasattr(getattr(layer, "impl", None), "do_kv_cache_update")), key=lambda t: t[0])
        self._layers_writer.start(meta.loads, layers)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._layers_writer.wait(layer_name)

    def _finish_loads(self) -> None:
        """Wait for the last step's writes (every layer written, failed blocks recorded) before anything else."""
        self._load_errors.update(self._layers_writer.finish())
        reasons, self._layers_writer.reasons = self._layers_writer.reasons, []
        for why in reasons:  # vLLM recomputes (or fails) these requests: counted as refusals, by reason
            self._counts.count("vllm:kvmem_refusals_total", refusal_reason(why))

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        """Copy this layer's KV of every request saved this step out of the paged cache (its blocks may be
        reused once the step ends); the copies wait in memory for `wait_for_save`."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvmemConnectorMetadata) or not meta.saves:
            return
        for save in meta.saves:
            got = self._collected.setdefault(save.request_id, {})
            if got is None:
                continue
            try:
                key = (tuple(kv_layer.shape[1:]), kv_layer.dtype, str(kv_layer.device))
                if key not in self._layouts:
                    from vllm.forward_context import get_forward_context

                    layer = get_forward_context().no_compile_layers[layer_name]
                    self._layouts[key] = PagedLayout.learn(layer, kv_layer, block_size=self._block_size)
                got[layer_index(layer_name)] = self._layouts[key].read(kv_layer, save.block_ids, save.spec.tokens)
            except Exception as exc:  # a save must never fail the request it rides on
                logger.exception("kvmem: copying the KV of request %s failed (%s: %s): cube %r is not saved",
                                 save.request_id, type(exc).__name__, exc, save.spec.name)
                self._collected[save.request_id] = None
                self._counts.count("vllm:kvmem_cubes_saved_total", "failed")

    def wait_for_save(self):
        """End of the step: the loader thread is done; hand this step's copied KV to the background writer (the
        cube is validated and written off the request's path)."""
        self._finish_loads()
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvmemConnectorMetadata) or not meta.saves:
            return
        for save in meta.saves:
            got = self._collected.pop(save.request_id, None)
            if not got:
                continue
            if sorted(got) != list(range(len(got))):
                logger.error("kvmem: request %s: KV of layers %s copied, not every layer: cube %r is not saved",
                             save.request_id, sorted(got), save.spec.name)
                self._counts.count("vllm:kvmem_cubes_saved_total", "failed")
                continue
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmem-save",
                                                  initializer=pin_thread, initargs=(self._cpus,))
                self._source = CubeSource(store=self._extra.get("store"), folder=self._extra.get("folder"))
            self._writer.submit(self._write, save, [got[i] for i in range(len(got))], self._key_block_size())

    def _key_block_size(self) -> int | None:
        """The block size a saved cube's key-blocks sidecar is written for (`kvmem.integrations.key_blocks`): this
        engine's, where its cache keeps keys as columns per block (vLLM CPU, float32) and ``key_blocks`` is on
        (the default); else None."""
        if not self._extra.get("key_blocks", True):
            return None
        forms = {layout.forms()[0][0] if layout.forms()[0] else None for layout in self._layouts.values()}
        return self._block_size if forms == {"cols"} else None

    def _write(self, save: _Save, kv: list[tuple[torch.Tensor, torch.Tensor]], key_block_size: int | None) -> None:
        import vllm

        t0 = time.perf_counter()
        try:
            cube = build_cube(kv, save.spec, fields=save.fields, engine=f"vllm {vllm.__version__}")
            where = write_cube(self._source, save.spec, cube, key_block_size=key_block_size)
        except Exception as exc:
            logger.error("kvmem: saving cube %r of request %s failed: %s: %s", save.spec.name, save.request_id,
                         type(exc).__name__, exc)
            self._counts.count("vllm:kvmem_cubes_saved_total", "failed")
            return
        self._counts.count("vllm:kvmem_cubes_saved_total", "saved")
        if save.spec.auto and self._autosave is not None:
            # its key blocks count too, where they were written (beside a folder cube or a store's blob, in Redis)
            nbytes = cube.nbytes + where.key_blocks_bytes
            for gone in self._autosave.admit(self._source, save.spec, nbytes):
                logger.info("kvmem: auto-saved cube %s deleted: auto-saved cubes exceed autosave_bytes", gone)
        logger.info("kvmem: saved cube %r (%d tokens, %.1f MB) of request %s to %s in %.0f ms", save.spec.name,
                    save.spec.tokens, cube.nbytes / 1e6, save.request_id, where, 1e3 * (time.perf_counter() - t0))

    # ---------------------------------------------------------------- metrics (vLLM's /metrics)
    def get_kv_connector_stats(self) -> KvmemStats | None:
        return self._counts.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvmemStats:
        return KvmemStats(data=data) if data is not None else KvmemStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> KvmemPromMetrics:
        return KvmemPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self):
        self._finish_loads()
        self._layers_writer.close()
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # cubes being written are finished, not lost

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

"""What an operator watches: the kvmem connector's counters in vLLM's Prometheus ``/metrics``, beside vLLM's own.

Through vLLM's connector stats API: each side of the connector (scheduler, worker) counts into a `KvmemStats`,
vLLM collects and merges them every step (``get_kv_connector_stats``) and hands them to `KvmemPromMetrics`, which
vLLM builds once per server (``build_prom_metrics``). Every metric carries vLLM's own labels (``model_name``,
``engine``) and, where it says so, one of kvmem's. docs/serving-vllm.md shows how to read them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

# name -> (help, kvmem's label or None); counters only grow, over the server's lifetime
COUNTERS = {
    "vllm:kvmem_cubes_served_total": (
        "Requests that got their prefix KV from kvmem cubes, by kind: exact (one cube, what vLLM computes) or "
        "approximate (composed, precomposed or cast; salted apart)", "kind"),
    "vllm:kvmem_refusals_total": (
        "Requests whose cubes kvmem refused, by reason; each was prefilled as if kvmem were not there", "reason"),
    "vllm:kvmem_cube_loads_total": ("Cubes read from their source (folder, store or Redis) and validated", None),
    "vllm:kvmem_cube_bytes_read_total": ("Bytes of cube KV read from sources", None),
    "vllm:kvmem_cubes_saved_total": (
        "Cubes the server was asked to save, by result: saved, refused (the request's save was not valid) or "
        "failed (copy or write error; logged)", "result"),
    "vllm:kvmem_salted_requests_total": ("Requests whose prefix-cache blocks were keyed by their namespace", None),
}
GAUGES = {
    "vllm:kvmem_salted_namespaces": ("Distinct namespaces whose requests were salted since the server started", None),
}

# refusal messages -> reason label (the first substring found wins; kvmem's messages say these words)
REASONS = (("checksum", "corrupt"), ("fingerprint", "foreign_model"), ("weights", "foreign_model"),
           ("tokenizer", "foreign_model"), ("no cube", "missing"), ("not served", "namespace"),
           ("does not start with", "not_a_prefix"), ("less than one KV block", "too_short"),
           ("unreachable", "store_unreachable"), ("calibration", "below_fidelity"))


def refusal_reason(message: str) -> str:
    """The ``reason`` label of a refusal, from its message (``other`` when none of the known words appear)."""
    low = message.lower()
    return next((reason for word, reason in REASONS if word.lower() in low), "other")


@dataclass
class KvmemStats(KVConnectorStats):
    """One interval's counts: ``data = {"counters": {"name|label": n}, "gauges": {"name|label": v}}`` (flat string
    keys, no lock inside: the payload crosses processes as plain data; `Counts` guards it across threads)."""

    def __post_init__(self):
        if "counters" not in self.data:
            self.reset()

    def reset(self):
        self.data = {"counters": {}, "gauges": {}}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if other.is_empty():
            return self
        for key, n in other.data.get("counters", {}).items():
            self.data["counters"][key] = self.data["counters"].get(key, 0) + n
        self.data["gauges"].update(other.data.get("gauges", {}))
        return self

    def reduce(self) -> dict[str, int | float]:
        return {**self.data["counters"], **self.data["gauges"]}

    def is_empty(self) -> bool:
        return not self.data["counters"] and not self.data["gauges"]


class Counts:
    """One side of the connector's running interval of `KvmemStats`, counted from any thread."""

    def __init__(self):
        self._lock = threading.Lock()  # the worker's background writer counts from its own thread
        self._stats = KvmemStats()

    def count(self, name: str, label: str | None = None, n: int | float = 1) -> None:
        key = name if label is None else f"{name}|{label}"
        with self._lock:
            counters = self._stats.data["counters"]
            counters[key] = counters.get(key, 0) + n

    def gauge(self, name: str, value: int | float) -> None:
        with self._lock:
            self._stats.data["gauges"][name] = value

    def take(self) -> KvmemStats | None:
        """This interval's counts (None when there are none); the next interval starts empty."""
        with self._lock:
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, KvmemStats()
        return out


class KvmemPromMetrics(KVConnectorPromMetrics):
    """The Prometheus counters and gauges of `COUNTERS` and `GAUGES`, fed from merged `KvmemStats` payloads."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._defs = {}
        for table, cls, extra in ((COUNTERS, self._counter_cls, {}),
                                  (GAUGES, self._gauge_cls, {"multiprocess_mode": "mostrecent"})):
            for name, (doc, label) in table.items():
                self._defs[name] = cls(name=name, documentation=doc,
                                       labelnames=self._labelnames + ([label] if label else []), **extra)
        self._children: dict[tuple[int, str], Any] = {}

    def _child(self, engine_idx: int, key: str):
        if (engine_idx, key) not in self._children:
            name, _, label = key.partition("|")
            values = list(self.per_engine_labelvalues[engine_idx]) + ([label] if label else [])
            self._children[(engine_idx, key)] = self._defs[name].labels(*values)
        return self._children[(engine_idx, key)]

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for key, n in transfer_stats_data.get("counters", {}).items():
            if key.partition("|")[0] in COUNTERS:
                self._child(engine_idx, key).inc(n)
        for key, value in transfer_stats_data.get("gauges", {}).items():
            if key.partition("|")[0] in GAUGES:
                self._child(engine_idx, key).set(value)

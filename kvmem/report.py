"""GenerationReport: what one `MemoryModel.generate` call did, kept in ``mm.last``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationReport:
    """What the last `MemoryModel.generate` did (``mm.last``).

    Attributes:
        ttft_s: seconds from the call to the first new token's logits (device synchronised).
        injected: whether cubes were spliced (False: everything was prefilled).
        cube_names, spans: the injected cubes, and where each sits in the prompt ids.
        prompt_tokens: all ids before the first new token; prefilled_tokens: of those, the ones this request ran
            through the model.
        memories: ``cubes="auto"``: each memory used, in rank order: id, namespace, score, tokens and source
            ("device", "cpu" or "disk": the tier its cube came from; "text": prefilled as text).
        dropped: ``cubes="auto"``: each retrieved memory left out, with the reason.
        quantized: each quantized cube injected: name, scheme and its measured error (kl_mean, kl_max nats of
            next-token KL and greedy_same, against the full-width cube, measured when it was saved).
        composition: several cubes composed by the gate (``recompute="auto"``, the default): the setting it chose
            ("leading@32", "text", ...) and why (the calibration's measurement, or "uncalibrated").
        rows: for a batch (``generate([...])``), one report per prompt (the batch's own has its TTFT and padded
            prompt length).
        adapter_refused: the request's AdapterCube was not used (the base model answered) because it learned a
            memory since deleted, expired, or edited and retrieved by this request in its new version: each
            stale source with its reason (`kvmem.store.lineage.unusable_reasons`). Empty: no refusal.
    """

    ttft_s: float | None = None
    injected: bool = False
    cube_names: list[str] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    memories: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    quantized: list[dict] = field(default_factory=list)
    composition: str = ""
    rows: list["GenerationReport"] = field(default_factory=list)
    adapter_refused: list[dict] = field(default_factory=list)

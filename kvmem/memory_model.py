"""kvmem.wrap: a model + tokenizer that injects memory cubes into chat prompts, around the model's own generate.

The memory goes into the system message. The chat template is split there: everything before the memory is
the *anchor* (cubes are built after it, see `build_cube`), everything after it is the request's own tokens,
the only ones a request with cubes prefills.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapter import AdapterCube
from .adapter_bridge import DEFAULT_BUDGET_BYTES, AdapterBridge
from .cache import cache_kwarg
from .cube import MemCube
from .errors import CubeError
from .index import check_meta
from .modelinfo import model_device
from .prefill import prefill
from .timing import FirstTokenClock

_SLOT = "\u2063kvmem-memory\u2063"  # marks where the memory sits when rendering the chat template


@dataclass
class GenerationReport:
    """What the last `MemoryModel.generate` did."""

    ttft_s: float | None = None
    injected: bool = False
    cube_names: list[str] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    prompt_tokens: int = 0       # all ids before the first new token
    prefilled_tokens: int = 0    # of those, the ones this request ran through the model
    memories: list[dict] = field(default_factory=list)  # cubes="auto": what was chosen, score, where it came from


def wrap(model, tokenizer, *, system_prompt: str | None = None, adapter_budget_bytes: int = DEFAULT_BUDGET_BYTES,
         hotswap: bool = False, max_rank: int | None = None) -> "MemoryModel":
    """Wrap ``model`` and ``tokenizer`` so that ``generate(prompt, cubes=[...])`` injects memory cubes.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer (a chat template is used when it has one).
        system_prompt: text that opens the system message, before the memory (part of the anchor).
        adapter_budget_bytes: how many bytes of LoRA weights stay resident for instant swaps (LRU beyond).
        hotswap: one adapter slot overwritten in place (no recompilation of a torch.compile'd model; adapters
            must target the same modules with rank <= the slot's, see ``max_rank``).

    Example:
        >>> mm = kvmem.wrap(model, tokenizer)
        >>> cube = mm.build_cube(open("notes.txt").read())
        >>> out = mm.generate("Where does Alice live?", cubes=[cube], max_new_tokens=32)
    """
    if not hasattr(model, "generate"):
        raise CubeError(f"wrap needs a transformers generative model, got {type(model).__name__}")
    if not callable(tokenizer):
        raise CubeError(f"wrap needs a tokenizer, got {type(tokenizer).__name__}")
    return MemoryModel(model, tokenizer, system_prompt=system_prompt, adapter_budget_bytes=adapter_budget_bytes,
                       hotswap=hotswap, max_rank=max_rank)


class MemoryModel:
    """A model with memory: see `wrap`."""

    def __init__(self, model, tokenizer, *, system_prompt: str | None = None,
                 adapter_budget_bytes: int = DEFAULT_BUDGET_BYTES, hotswap: bool = False, max_rank: int | None = None):
        self.adapters = AdapterBridge(model, budget_bytes=adapter_budget_bytes, hotswap=hotswap, max_rank=max_rank)
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.last = GenerationReport()
        self.anchor, self._tail_template = self._split_template()
        self.store = self.index = self.scheduler = None

    @property
    def model(self):
        """The model that runs, with the active adapter applied (a PeftModel once an adapter was used)."""
        return self.adapters.model

    @property
    def _model(self):
        return self.adapters.model

    @property
    def adapter(self) -> AdapterCube | None:
        """The active AdapterCube (None: the base model)."""
        return self.adapters.active

    def use_adapter(self, cube: AdapterCube | None) -> None:
        """Hot-swap the active LoRA adapter; ``None`` restores the base model exactly.

        KV cubes record the adapter they were built under: injecting one under another adapter raises
        FingerprintMismatch.
        """
        self.adapters.use(cube)

    # ---------------------------------------------------------------- prompts
    def _render(self, memory: str, prompt: str) -> str:
        system = f"{self.system_prompt}\n\n{memory}" if self.system_prompt else memory
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{system}\n\n{prompt}\n"

    def _split_template(self) -> tuple[str, str]:
        text = self._render(_SLOT, _SLOT + "q")
        head, _, tail = text.partition(_SLOT)
        if not _SLOT + "q" in tail:
            raise CubeError("the chat template does not place the system message before the user message; "
                            "kvmem needs memory in the system message")
        bos = getattr(self.tokenizer, "bos_token", None)
        if not head and bos and self.tokenizer("", add_special_tokens=True).input_ids[:1] == [self.tokenizer.bos_token_id]:
            head = bos
        return head, tail

    def _tail_ids(self, prompt: str) -> torch.Tensor:
        tail = self._tail_template.replace(_SLOT + "q", prompt)
        return torch.tensor(self.tokenizer(tail, add_special_tokens=False).input_ids, dtype=torch.long)

    def build_cube(self, text: str, name: str | None = None, **kwargs) -> MemCube:
        """A cube of ``text`` built after this model's anchor, ready for ``generate(..., cubes=[cube])``."""
        return MemCube.from_text(self._model, self.tokenizer, text, name=name, anchor=self.anchor, **kwargs)

    def prompt_ids(self, prompt: str, cubes: list[MemCube]) -> torch.Tensor:
        """LongTensor [1, n]: the ids a full prefill of ``prompt`` with ``cubes`` as memory would process."""
        cubes = self._check_cubes(cubes)
        anchor = cubes[0].anchor_ids[0] if cubes else torch.tensor(
            self.tokenizer(self.anchor, add_special_tokens=False).input_ids, dtype=torch.long)
        parts = [anchor] + [c.input_ids[0] for c in cubes] + [self._tail_ids(prompt)]
        return torch.cat(parts)[None]

    def _check_cubes(self, cubes) -> list[MemCube]:
        if cubes is None:
            return []
        if isinstance(cubes, MemCube):
            cubes = [cubes]
        cubes = list(cubes)
        for c in cubes:
            if not isinstance(c, MemCube):
                raise CubeError(f"cubes must be MemCubes, got {type(c).__name__} (load files with MemCube.load)")
            if c.anchor != self.anchor:
                raise CubeError(f"cube {c.name!r} was built after the anchor {c.anchor!r}, but this model's chat "
                                f"template puts memory after {self.anchor!r}; build it with mm.build_cube(text) "
                                "or MemCube.from_text(..., anchor=mm.anchor)")
        return cubes

    # ---------------------------------------------------------------- memory that picks itself
    def attach(self, view, *, index=None, scheduler=None, **scheduler_kwargs) -> "MemoryModel":
        """Give this model a store: then ``generate(prompt, cubes="auto")`` picks memories itself.

        Args:
            view: a `StoreView` (``kvmem.CubeStore(path).view(namespace, shared=...)``).
            index: a `MemoryIndex` (default: built over everything the view sees).
            scheduler: a `MemScheduler` (default: one over the view, on the model's device).
            **scheduler_kwargs: options for the default scheduler (budgets, policy, promote_after, background).
        """
        from .index import MemoryIndex
        from .scheduler import MemScheduler

        self.store = view
        self.index = index if index is not None else MemoryIndex.from_store(view)
        device = model_device(self._model)
        self.scheduler = scheduler if scheduler is not None else MemScheduler(
            view, device=device, builder=self._promote, **scheduler_kwargs)
        return self

    def _require_store(self):
        if self.store is None:
            raise CubeError("this MemoryModel has no store: call mm.attach(kvmem.CubeStore(path).view(namespace)) "
                            "first, or pass cubes=[...] explicitly")

    def remember(self, text: str, memory_id: str | None = None, *, meta: dict | None = None, cube: bool = False):
        """Add a plaintext memory to the attached store and index (and build its cube now if ``cube``)."""
        import xxhash

        self._require_store()
        meta = check_meta(meta)  # before the store write, so a bad meta leaves store and index as they were
        memory_id = memory_id or "m-" + xxhash.xxh3_64(text.encode()).hexdigest()[:12]
        rec = self.store.add(memory_id, text, meta)
        self.index.add(memory_id, text, rec.meta)
        self.scheduler.forget(memory_id)
        if cube:
            self._promote(memory_id)
        return memory_id

    def _promote(self, memory_id: str) -> MemCube:
        """Build the activation cube of a plaintext memory and store it (the plaintext -> activation path)."""
        rec = self.store.get(memory_id)
        cube = self.build_cube(rec.text, name=memory_id)
        if rec.namespace == self.store.namespace:  # shared namespaces are read-only: keep the cube in memory only
            self.store.put_cube(memory_id, cube, text=rec.text)
        return cube

    def _auto_cubes(self, prompt: str, budget_tokens: int, k: int) -> tuple[list[MemCube], list[dict]]:
        """The best memories for ``prompt`` that fit ``budget_tokens``, as cubes, with a report of each."""
        self._require_store()
        if not isinstance(budget_tokens, int) or budget_tokens < 1:
            raise CubeError(f"budget_tokens must be a positive int, got {budget_tokens!r}")
        chosen, report, used = [], [], 0
        hits = self.index.search(prompt, k=k)
        self._prefetch_next = [m for m, _ in hits]
        for memory_id, score in hits:
            rec = self.store.get(memory_id)
            if rec is None:  # deleted by another process since the index saw it
                continue
            tokens = rec.tokens or len(self.tokenizer(rec.text, add_special_tokens=False).input_ids)
            if used + tokens > budget_tokens:
                continue
            has_cube = rec.path is not None
            promoted = self.scheduler.retrieved(memory_id, has_cube)
            before = dict(self.scheduler.counters)
            cube = self.scheduler.get(memory_id) if has_cube or promoted else None
            if cube is not None:
                source = next((t for t in ("device", "cpu", "disk")
                               if self.scheduler.counters[f"hits_{t}"] > before.get(f"hits_{t}", 0)), "promoted")
                source = "promoted" if promoted and not has_cube else source
            else:  # plaintext only: a cube for this request, not kept (promotion keeps it once it is popular)
                cube, source = self.build_cube(rec.text, name=memory_id), "built"
            self.store.touch(memory_id)
            chosen.append(cube)
            report.append({"id": memory_id, "namespace": rec.namespace, "score": round(score, 4), "tokens": tokens,
                           "source": source})
            used += tokens
        return chosen, report

    # ---------------------------------------------------------------- generation
    def generate(self, prompt: str, cubes=None, *, inject: bool = True, recompute: str | None = None,
                 budget=None, adapter: AdapterCube | None | str = "keep", budget_tokens: int = 2048, k: int = 10,
                 **kwargs):
        """Answer ``prompt`` with ``cubes`` as memory; returns what the model's own ``generate`` returns.

        Args:
            prompt: the user's message.
            cubes: MemCubes (built with `build_cube`) whose text forms the memory, in order; or "auto": the
                attached store's index picks the best memories that fit ``budget_tokens`` (top ``k`` considered),
                served from the scheduler's fastest tier (see `attach`; ``self.last.memories`` says which).
            inject: True splices the cubes' KV and prefills only the request's own tokens; False prefills the
                same ids in full (the baseline, same output up to float rounding).
            recompute, budget: passed to `kvmem.prefill` (None: its default).
            adapter: an AdapterCube (or None for the base model) for this request only; the previously active
                adapter is restored afterwards. "keep" (default) uses whatever is active.
            **kwargs: passed to ``model.generate`` (max_new_tokens, do_sample, ...).

        After the call, ``self.last`` reports TTFT, tokens prefilled and where each cube sat.
        """
        if not isinstance(prompt, str):
            raise CubeError(f"prompt must be a string, got {type(prompt).__name__}")
        for key in ("input_ids", "past_key_values", "cache"):
            if key in kwargs:
                raise CubeError(f"do not pass {key}= to MemoryModel.generate: it builds them from prompt and cubes "
                                "(call model.generate yourself with kvmem.prefill for full control)")
        if isinstance(adapter, str) and adapter != "keep":
            raise CubeError(f"adapter must be an AdapterCube, None or 'keep', got {adapter!r}")
        if adapter != "keep":
            previous = self.adapters.active
            self.use_adapter(adapter)
            try:
                return self.generate(prompt, cubes, inject=inject, recompute=recompute, budget=budget,
                                     budget_tokens=budget_tokens, k=k, **kwargs)
            finally:
                self.use_adapter(previous)
        clock = FirstTokenClock().start()
        memories = []
        if isinstance(cubes, str):
            if cubes != "auto":
                raise CubeError(f"cubes must be MemCubes, None or 'auto', got {cubes!r}")
            cubes, memories = self._auto_cubes(prompt, budget_tokens, k)
        cubes = self._check_cubes(cubes)
        kwargs["logits_processor"] = list(kwargs.get("logits_processor") or []) + [clock]
        device = model_device(self._model)
        report = GenerationReport(cube_names=[c.name for c in cubes], memories=memories)
        if cubes and inject:
            options = {name: v for name, v in (("recompute", recompute), ("budget", budget)) if v is not None}
            prefix = prefill(self._model, cubes, tokenizer=self.tokenizer, **options)
            ids = prefix.extend(self._tail_ids(prompt).to(device))
            kwargs[cache_kwarg(self._model)] = prefix.cache
            report.injected, report.spans = True, prefix.spans
            report.prefilled_tokens = ids.shape[1] - prefix.num_tokens
        else:
            ids = self.prompt_ids(prompt, cubes).to(device)
            report.prefilled_tokens = ids.shape[1]
        report.prompt_tokens = ids.shape[1]
        if "pad_token_id" not in kwargs and getattr(self._model.generation_config, "pad_token_id", None) is None:
            kwargs["pad_token_id"] = self.tokenizer.eos_token_id
        out = self._model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        report.ttft_s = clock.ttft_s
        self.last = report
        if memories:  # after the answer, not before its first token: warm the CPU tier with the other top hits
            used = {m["id"] for m in memories}
            self.scheduler.prefetch([m for m in self._prefetch_next if m not in used])
        return out

    def answer(self, prompt: str, cubes=None, **kwargs) -> str:
        """`generate`, decoded: the new text only."""
        kwargs.setdefault("max_new_tokens", 64)
        kwargs.setdefault("do_sample", False)
        out = self.generate(prompt, cubes, **kwargs)
        seq = out.sequences if hasattr(out, "sequences") else out
        return self.tokenizer.decode(seq[0, self.last.prompt_tokens:], skip_special_tokens=True).strip()

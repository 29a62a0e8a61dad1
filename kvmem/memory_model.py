"""kvmem.wrap: a model + tokenizer whose ``generate`` answers with memory.

`MemoryModel.generate` reads as: render the prompt (`kvmem.prompt.ChatLayout`), recall memories
(`kvmem.recall.Recall`, for ``cubes="auto"``), prefill (`kvmem.prefill`, the one gate that validates cubes),
generate (the model's own ``generate``), report (`GenerationReport` in ``mm.last``).
"""

from __future__ import annotations

import torch

from ._deprecation import renamed
from .adapter import AdapterCube
from .adapter_bridge import DEFAULT_CAPACITY_BYTES, AdapterBridge
from .attention import grouped_sdpa, use_gqa_attention
from .cache import cache_kwarg
from .cube import MemCube
from .errors import CubeError
from .modelinfo import check_context, context_length, model_device
from .prefix import prefill
from .prefix_cache import sequences_per_prompt, static_capable, static_prefix, static_room
from .prompt import ChatLayout
from .recall import Recall
from .report import GenerationReport
from .timing import FirstTokenClock


def wrap(model, tokenizer, *, system_prompt: str | None = None,
         adapter_capacity_bytes: int = DEFAULT_CAPACITY_BYTES, hotswap: bool = False, max_rank: int | None = None,
         attention: str = "auto", cache: str = "auto", **deprecated) -> "MemoryModel":
    """Wrap ``model`` and ``tokenizer`` so that ``generate(prompt, cubes=[...])`` injects memory cubes.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer (its chat template is used when it has one; else a plain layout, see
            `kvmem.prompt.ChatLayout`).
        system_prompt: text that opens the system message, before the memory (part of the anchor).
        adapter_capacity_bytes: how many bytes of LoRA weights stay resident for instant swaps (LRU beyond);
            formerly ``adapter_budget_bytes``.
        hotswap: one adapter slot overwritten in place (no recompilation of a torch.compile'd model; adapters
            must target the same modules with rank <= the slot's, see ``max_rank``).
        attention: "auto" switches a model on stock ``sdpa`` whose layers group key/value heads (GQA) to
            ``kvmem_sdpa`` (`kvmem.attention`: same results, the memory's KV heads never expanded; this changes
            ``model`` itself); "keep" leaves the model's attention as it is.
        cache: "auto" moves the prefix into a static cache sized for the request and its new tokens when
            generation has a length bound and one sequence per prompt (no copy of the memory per decode step;
            transformers' auto-compile of static-cache decoding stays off unless you pass ``compile_config``),
            else a DynamicCache; "dynamic" always uses a DynamicCache, as `kvmem.prefill` returns.

    Example:
        >>> mm = kvmem.wrap(model, tokenizer)
        >>> cube = mm.build_cube(open("notes.txt").read())
        >>> out = mm.generate("Where does Alice live?", cubes=[cube], max_new_tokens=32)
    """
    adapter_capacity_bytes = renamed(deprecated, "adapter_budget_bytes", "adapter_capacity_bytes",
                                     adapter_capacity_bytes, where="wrap()")
    if deprecated:
        raise TypeError(f"wrap() got unexpected keyword arguments {sorted(deprecated)}")
    if not hasattr(model, "generate"):
        raise CubeError(f"wrap needs a transformers generative model, got {type(model).__name__}")
    if not callable(tokenizer):
        raise CubeError(f"wrap needs a tokenizer, got {type(tokenizer).__name__}")
    return MemoryModel(model, tokenizer, system_prompt=system_prompt, adapter_capacity_bytes=adapter_capacity_bytes,
                       hotswap=hotswap, max_rank=max_rank, attention=attention, cache=cache)


class MemoryModel:
    """A model with memory: see `wrap`."""

    def __init__(self, model, tokenizer, *, system_prompt: str | None = None,
                 adapter_capacity_bytes: int = DEFAULT_CAPACITY_BYTES, hotswap: bool = False,
                 max_rank: int | None = None, attention: str = "auto", cache: str = "auto"):
        if attention not in ("auto", "keep") or cache not in ("auto", "dynamic"):
            raise CubeError(f"attention must be 'auto' or 'keep' and cache 'auto' or 'dynamic', got {attention!r} "
                            f"and {cache!r}")
        if attention == "auto" and grouped_sdpa(model):
            use_gqa_attention(model)
        self.cache = cache
        self.adapters = AdapterBridge(model, capacity_bytes=adapter_capacity_bytes, hotswap=hotswap,
                                      max_rank=max_rank)
        self.tokenizer = tokenizer
        self.layout = ChatLayout(tokenizer, system_prompt)
        self.last = GenerationReport()
        self.recall: Recall | None = None
        self.store = self.index = self.scheduler = None  # set by attach: the StoreView, MemoryIndex, MemScheduler

    @property
    def model(self):
        """The model that runs, with the active adapter applied (a PeftModel once an adapter was used)."""
        return self.adapters.model

    @property
    def system_prompt(self) -> str | None:
        return self.layout.system_prompt

    @property
    def anchor(self) -> str:
        """The text every cube of this model is built after (the chat template up to the memory)."""
        return self.layout.anchor

    @property
    def adapter(self) -> AdapterCube | None:
        """The active AdapterCube (None: the base model)."""
        return self.adapters.active

    def use_adapter(self, cube: AdapterCube | None) -> None:
        """Hot-swap the active LoRA adapter; ``None`` restores the base model exactly.

        KV cubes record the adapter they were built under: injecting one under another adapter raises
        FingerprintMismatch. For one request only: ``with mm.adapters.using(cube): ...`` or
        ``generate(..., adapter=cube)``.
        """
        self.adapters.use(cube)

    # ---------------------------------------------------------------- cubes and prompt ids
    def build_cube(self, text: str, name: str | None = None, **kwargs) -> MemCube:
        """A cube of ``text`` built after this model's anchor, ready for ``generate(..., cubes=[cube])``."""
        return MemCube.from_text(self.model, self.tokenizer, text, name=name, anchor=self.anchor, **kwargs)

    def request_ids(self, prompt: str) -> torch.Tensor:
        """LongTensor [n]: the request's own ids, after the memory (the rest of the template, with ``prompt``)."""
        return self.layout.request_ids(prompt)

    def prompt_ids(self, prompt: str, cubes: list[MemCube], texts: list[str] = ()) -> torch.Tensor:
        """LongTensor [1, n]: the ids a full prefill of ``prompt`` with ``cubes`` (then ``texts``) as memory
        would process."""
        return self.layout.prompt_ids(prompt, self.layout.fit(cubes), texts)

    # ---------------------------------------------------------------- memory that picks itself
    def attach(self, view, *, index=None, scheduler=None, **scheduler_kwargs) -> "MemoryModel":
        """Give this model a store: then ``generate(prompt, cubes="auto")`` picks memories itself.

        Args:
            view: a `StoreView` (``kvmem.CubeStore(path).view(namespace, shared=...)``).
            index: a `MemoryIndex` to fill (default: a new one, embeddings cached in the store's folder). Its ids
                are qualified ids ``namespace/id`` (a view sees several namespaces; ids may repeat across them).
            scheduler: a `MemScheduler` (default: one over the view, on the model's device).
            **scheduler_kwargs: options for the default scheduler (tier sizes, policy, promote_after, background).
        """
        self.recall = Recall.over(view, index=index, scheduler=scheduler, device=model_device(self.model),
                                  build_cube=self.build_cube, count_tokens=lambda t: len(self.layout.memory_ids(t)),
                                  cube_tokens=self._cube_tokens(), **scheduler_kwargs)
        self.store, self.index, self.scheduler = view, self.recall.index, self.recall.scheduler
        return self

    def _cube_tokens(self) -> int | None:
        limit = context_length(self.model)
        return None if limit is None else limit - len(self.layout.anchor_ids())

    def _require_store(self) -> Recall:
        if self.recall is None:
            raise CubeError("this MemoryModel has no store: call mm.attach(kvmem.CubeStore(path).view(namespace)) "
                            "first, or pass cubes=[...] explicitly")
        return self.recall

    def remember(self, text: str, memory_id: str | None = None, *, meta: dict | None = None, cube: bool = False):
        """Add a plaintext memory to the attached store and index (and build its cube now if ``cube``).
        Returns its id (minted from the text when not given)."""
        return self._require_store().remember(text, memory_id, meta=meta, cube=cube)

    # ---------------------------------------------------------------- generation
    def generate(self, prompt: str | list[str], cubes=None, *, inject: bool = True, recompute: str | None = None,
                 budget=None, adapter: AdapterCube | None | str = "keep", max_memory_tokens: int = 2048,
                 k: int = 10, min_score: float | None = None, evidence: bool = True, **kwargs):
        """Answer ``prompt`` with ``cubes`` as memory; returns what the model's own ``generate`` returns.

        Args:
            prompt: the user's message; or a list of them: one ``model.generate`` call for the batch, each row
                with its own cubes (``cubes``: one entry per prompt, or "auto"), left-padded as transformers pads
                a batch; each row's greedy tokens equal the same request alone. Then ``self.last.rows`` holds one
                report per prompt.
            cubes: MemCubes (built with `build_cube`) whose text forms the memory, in order; or "auto": the
                attached store's index picks the best memories (top ``k``, score >= ``min_score``, and with
                ``evidence`` some evidence of relevance: `kvmem.recall.relevant`) that fit
                ``max_memory_tokens`` (formerly ``budget_tokens``); each comes from the scheduler's fastest tier
                as a cube, or as text prefilled with the request when it has no cube yet or is shorter than
                `kvmem.recall.TEXT_BELOW_TOKENS` (``self.last.memories`` / ``self.last.dropped`` say which).
            inject: True splices the cubes' KV and prefills only the request's own tokens; False prefills the
                same ids in full (the baseline, same output up to float rounding).
            recompute, budget: passed to `kvmem.prefill` (None: its default); ``budget`` is the recompute budget.
            adapter: an AdapterCube (or None for the base model) for this request only; the previously active
                adapter is restored afterwards. "keep" (default) uses whatever is active.
            **kwargs: passed to ``model.generate`` (max_new_tokens, do_sample, ...).

        After the call, ``self.last`` (a `GenerationReport`) reports TTFT, tokens prefilled and where each cube sat.
        """
        max_memory_tokens = renamed(kwargs, "budget_tokens", "max_memory_tokens", max_memory_tokens,
                                    where="MemoryModel.generate")
        if isinstance(prompt, (list, tuple)):
            from .batch_generate import generate_batch

            return generate_batch(self, list(prompt), cubes, inject=inject, recompute=recompute, budget=budget,
                                  adapter=adapter, recall_options=dict(max_tokens=max_memory_tokens, k=k,
                                                                       min_score=min_score, evidence=evidence),
                                  **kwargs)
        if not isinstance(prompt, str):
            raise CubeError(f"prompt must be a string, got {type(prompt).__name__}")
        for key in ("input_ids", "past_key_values", "cache", "cache_implementation"):
            if key in kwargs:
                raise CubeError(f"do not pass {key}= to MemoryModel.generate: it builds the inputs and the cache "
                                "from prompt and cubes (wrap(..., cache='dynamic') for a DynamicCache; call "
                                "model.generate yourself with kvmem.prefill for full control)")
        if isinstance(adapter, str) and adapter != "keep":
            raise CubeError(f"adapter must be an AdapterCube, None or 'keep', got {adapter!r}")
        if isinstance(cubes, str) and cubes != "auto":
            raise CubeError(f"cubes must be MemCubes, None or 'auto', got {cubes!r}")
        with self.adapters.using(adapter):
            clock = FirstTokenClock().start()
            recalled = None
            if isinstance(cubes, str):
                recalled = self._require_store().recall(prompt, max_tokens=max_memory_tokens, k=k,
                                                        min_score=min_score, evidence=evidence)
                cubes = recalled.cubes
            ids, report, options = self._prefill(prompt, cubes, recalled.texts if recalled else [], inject,
                                                 recompute, budget, kwargs)
            out = self._generate(ids, clock, **options, **kwargs)
            report.ttft_s = clock.ttft_s
            if recalled is not None:
                report.memories, report.dropped = recalled.memories, recalled.dropped
            self.last = report
        if recalled is not None:  # after the answer, not before its first token
            self.recall.after_answer(recalled)
        return out

    def _pad_id(self, kwargs: dict) -> int:
        """The pad id generate uses: the caller's, the model's, the tokenizer's, else EOS (popped from kwargs)."""
        for value in (kwargs.pop("pad_token_id", None), self.model.generation_config.pad_token_id,
                      self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if value is not None:
                return int(value)
        return 0

    def _prefill(self, prompt: str, cubes, texts: list[str], inject: bool, recompute, budget, gen_kwargs: dict):
        """The ids to generate from, the report so far, and generate's cache options (when cubes are spliced)."""
        cubes = self.layout.fit(cubes)
        device = model_device(self.model)
        report = GenerationReport(cube_names=[c.name for c in cubes])
        options = {}
        if cubes and inject:
            knobs = {name: v for name, v in (("recompute", recompute), ("budget", budget)) if v is not None}
            prefix = prefill(self.model, cubes, tokenizer=self.tokenizer, **knobs)
            own = [self.layout.memory_ids(t) for t in texts] + [self.request_ids(prompt)]
            ids = prefix.extend(torch.cat(own).to(device))
            room = static_room(self.model, ids.shape[1], gen_kwargs) if self.cache == "auto" else None
            if room is not None and static_capable(self.model):
                prefix = static_prefix(self.model, prefix, max_new_tokens=room,
                                       query_len=ids.shape[1] - prefix.num_tokens)
                options["disable_compile"] = gen_kwargs.pop("disable_compile", "compile_config" not in gen_kwargs)
            elif sequences_per_prompt(self.model, gen_kwargs) > 1:  # beams / several sequences: one copy per row
                prefix.cache.batch_repeat_interleave(sequences_per_prompt(self.model, gen_kwargs))
            options[cache_kwarg(self.model)] = prefix.cache
            report.injected, report.spans = True, prefix.spans
            report.prefilled_tokens = ids.shape[1] - prefix.num_tokens
        else:
            ids = self.prompt_ids(prompt, cubes, texts).to(device)
            report.prefilled_tokens = ids.shape[1]
        report.prompt_tokens = ids.shape[1]
        check_context(self.model, ids.shape[1], "the prompt (memory + request)",
                      "pass fewer or shorter memories (max_memory_tokens= for cubes='auto')")
        return ids, report, options

    def _generate(self, ids: torch.Tensor, clock: FirstTokenClock, **kwargs):
        kwargs["logits_processor"] = list(kwargs.get("logits_processor") or []) + [clock]
        if "pad_token_id" not in kwargs and getattr(self.model.generation_config, "pad_token_id", None) is None:
            kwargs["pad_token_id"] = self.tokenizer.eos_token_id
        return self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)

    def answer(self, prompt: str | list[str], cubes=None, **kwargs) -> str | list[str]:
        """`generate`, decoded: the new text only (a list of them for a list of prompts)."""
        kwargs.setdefault("max_new_tokens", 64)
        kwargs.setdefault("do_sample", False)
        out = self.generate(prompt, cubes, **kwargs)
        seq = out.sequences if hasattr(out, "sequences") else out
        texts = [self.tokenizer.decode(row[self.last.prompt_tokens:], skip_special_tokens=True).strip() for row in seq]
        return texts if isinstance(prompt, (list, tuple)) else texts[0]

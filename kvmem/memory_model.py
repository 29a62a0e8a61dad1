"""kvmem.wrap / MemoryModel: a model + tokenizer whose ``generate`` answers with memory.

`MemoryModel.generate` reads as: render the prompt (`kvmem.prompt.ChatLayout`), recall memories
(`kvmem.memory.recall.Recall`, for ``cubes="auto"``), prefill (`kvmem.prefill`, the one gate that validates cubes),
generate (the model's own ``generate``), report (`GenerationReport` in ``mm.last``).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack

import torch

from ._deprecation import renamed
from .cubes.adaptercube import AdapterCube
from .cubes.memcube import MemCube
from .errors import CubeError
from .inject.adapters import DEFAULT_CAPACITY_BYTES, AdapterBridge
from .inject.batch import prefill_batch
from .inject.splice_cubes import quantized_report
from .inject.gate import gate
from .inject.prefill import DEFAULT_RECOMPUTE, RECOMPUTE_MODES
from .memory.recall import Recall
from .model.attention import NAME as GQA_NAME, grouped_sdpa, use_gqa_attention
from .model.devices import model_device
from .model.facts import base_model, check_context, context_length
from .model.static_cache import sequences_per_prompt, static_capable, static_room
from .prompt import ChatLayout
from .report import GenerationReport
from .timing import FirstTokenClock

_log = logging.getLogger("kvmem")


def wrap(model, tokenizer, *, system_prompt: str | None = None,
         adapter_capacity_bytes: int = DEFAULT_CAPACITY_BYTES, hotswap: bool = False, max_rank: int | None = None,
         merge_adapters: bool = False, attention: str = "auto", cache: str = "auto", decode_kernel: bool = False,
         **deprecated) -> "MemoryModel":
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
        merge_adapters: serve an adapter from a copy of the weights with its LoRA merged in (made at its first
            use; the base model is untouched): the TTFT of the base model, for one more copy of the weights
            (`kvmem.inject.adapters`).
        attention: "auto" switches a model on stock ``sdpa`` whose layers group key/value heads (GQA) to
            ``kvmem_sdpa`` (`kvmem.model.attention`: same results, the memory's KV heads never expanded; this changes
            ``model`` itself); "keep" leaves the model's attention as it is.
        cache: "auto" moves the prefix into a static cache sized for the request and its new tokens when
            generation has a length bound and one sequence per prompt (no copy of the memory per decode step;
            transformers' auto-compile of static-cache decoding stays off unless you pass ``compile_config``),
            else a DynamicCache; "dynamic" always uses a DynamicCache, as `kvmem.prefill` returns.
        decode_kernel: run decode steps on kvmem's CPU decode kernel (`kvmem.kernels.cpu_decode`; built once per
            machine, ~25 s; float32 on a CPU with AVX-512, GQA models on ``kvmem_sdpa``): faster decoding over a
            long memory, exact to float rounding. Raises `CubeError` where it cannot be built or the model does
            not run ``kvmem_sdpa``; steps it does not apply to (bfloat16, a GPU, a batch) keep torch's kernel.

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
                       hotswap=hotswap, max_rank=max_rank, merge_adapters=merge_adapters, attention=attention,
                       cache=cache, decode_kernel=decode_kernel)


class MemoryModel:
    """A model with memory: see `wrap`."""

    def __init__(self, model, tokenizer, *, system_prompt: str | None = None,
                 adapter_capacity_bytes: int = DEFAULT_CAPACITY_BYTES, hotswap: bool = False,
                 max_rank: int | None = None, merge_adapters: bool = False, attention: str = "auto",
                 cache: str = "auto", decode_kernel: bool = False):
        if attention not in ("auto", "keep") or cache not in ("auto", "dynamic"):
            raise CubeError(f"attention must be 'auto' or 'keep' and cache 'auto' or 'dynamic', got {attention!r} "
                            f"and {cache!r}")
        if not isinstance(decode_kernel, bool):
            raise CubeError(f"decode_kernel must be True or False, got {decode_kernel!r:.40}")
        on_gqa = getattr(getattr(base_model(model), "config", None), "_attn_implementation", None) == GQA_NAME
        if attention == "auto" and (grouped_sdpa(model) or (decode_kernel and on_gqa)):
            use_gqa_attention(model, decode_kernel=decode_kernel)
        elif decode_kernel:
            raise CubeError("decode_kernel=True runs inside kvmem_sdpa: it needs attention='auto' and a model on "
                            "stock sdpa (or kvmem_sdpa) whose layers group key/value heads")
        self.cache = cache
        self.adapters = AdapterBridge(model, capacity_bytes=adapter_capacity_bytes, hotswap=hotswap,
                                      max_rank=max_rank, merged=merge_adapters)
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
    def attach(self, view, *, index=None, scheduler=None, allow_quantized: bool = False,
               **scheduler_kwargs) -> "MemoryModel":
        """Give this model a store: then ``generate(prompt, cubes="auto")`` picks memories itself.

        Args:
            view: a `StoreView` (``kvmem.CubeStore(path).view(namespace, shared=...)``).
            index: a `MemoryIndex` to fill (default: a new one, embeddings cached in the store's folder). Its ids
                are qualified ids ``namespace/id`` (a view sees several namespaces; ids may repeat across them).
            scheduler: a `MemScheduler` (default: one over the view, on the model's device).
            allow_quantized: let ``cubes="auto"`` use quantized cubes (approximate: their measured error shows in
                ``mm.last.quantized``); by default a memory whose cube is quantized is prefilled as its text.
            **scheduler_kwargs: options for the default scheduler (tier sizes, policy, promote_after, background).
        """
        self.recall = Recall.over(view, index=index, scheduler=scheduler, device=model_device(self.model),
                                  build_cube=self.build_cube, count_tokens=lambda t: len(self.layout.text_ids(t)),
                                  cube_tokens=self._cube_tokens(), **scheduler_kwargs)
        self.recall.allow_quantized = bool(allow_quantized)
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
                ``evidence`` some evidence of relevance: `kvmem.memory.recall.relevant`) that fit
                ``max_memory_tokens`` (formerly ``budget_tokens``); each comes from the scheduler's fastest tier
                as a cube, or as text prefilled with the request when it has no cube yet or is shorter than
                `kvmem.memory.recall.TEXT_BELOW_TOKENS` (``self.last.memories`` / ``self.last.dropped`` say which).
            inject: True splices the cubes' KV and prefills only the request's own tokens; False prefills the
                same ids in full (the baseline, same output up to float rounding).
            recompute, budget: passed to `kvmem.prefill`; ``budget`` is the recompute budget. None: "auto", the
                composition gate (this model's calibration; ``self.last.composition`` says what it chose and why).
            adapter: an AdapterCube (or None for the base model) for this request only; the previously active
                adapter is restored afterwards. "keep" (default) uses whatever is active.
            **kwargs: passed to ``model.generate`` (max_new_tokens, do_sample, ...).

        After the call, ``self.last`` (a `GenerationReport`) reports TTFT, tokens prefilled and where each cube sat.
        One prompt and a list of them take the same path: a single prompt is a batch of one.
        """
        max_memory_tokens = renamed(kwargs, "budget_tokens", "max_memory_tokens", max_memory_tokens,
                                    where="MemoryModel.generate")
        prompts, rows = self._rows(prompt, cubes)
        for key in ("input_ids", "attention_mask", "past_key_values", "cache", "cache_implementation"):
            if key in kwargs:
                raise CubeError(f"do not pass {key}= to MemoryModel.generate: it builds the inputs and the cache "
                                "from prompt and cubes (wrap(..., cache='dynamic') for a DynamicCache; call "
                                "model.generate yourself with kvmem.prefill for full control)")
        if kwargs.get("use_cache") is False and inject and any(r is not None for r in rows):
            raise CubeError("use_cache=False cannot inject memory: kvmem hands the memory to generate as its KV "
                            "cache. Pass inject=False to prefill the memory's text with the request instead")
        new = kwargs.get("max_new_tokens")
        if new is not None and (isinstance(new, bool) or not isinstance(new, int) or new < 1):
            raise CubeError(f"max_new_tokens must be an int >= 1, got {new!r}")
        if isinstance(adapter, str) and adapter != "keep":
            raise CubeError(f"adapter must be an AdapterCube, None or 'keep', got {adapter!r}")
        recall_options = dict(max_tokens=max_memory_tokens, k=k, min_score=min_score, evidence=evidence)
        with self.adapters.using(adapter), ExitStack() as stack:
            clock = FirstTokenClock().start()
            recalled = [self._require_store().recall(p, **recall_options) if isinstance(r, str) else None
                        for p, r in zip(prompts, rows)]
            refused = self._stale_adapter(recalled)
            if refused:  # it learned what this request must not hear (kvmem.store.lineage): the base model answers
                stack.enter_context(self.adapters.using(None))
            rows = [r.cubes if r is not None else self.layout.fit(c) for r, c in zip(recalled, rows)]
            texts = [r.texts if r is not None else [] for r in recalled]
            pad = self._pad_id(kwargs)
            reports = [GenerationReport(cube_names=[c.name for c in cubes], memories=r.memories if r else [],
                                        dropped=r.dropped if r else []) for cubes, r in zip(rows, recalled)]
            if inject and all(rows):
                inputs = self._spliced(prompts, rows, texts, reports, pad, recompute, budget, kwargs)
            else:  # a row without cubes (or inject=False): every row prefilled in full
                inputs = self._full(prompts, rows, texts, reports, pad, kwargs)
            kwargs["logits_processor"] = list(kwargs.get("logits_processor") or []) + [clock]
            out = self.model.generate(pad_token_id=pad, **inputs, **kwargs)
            for report in reports:
                report.adapter_refused = refused
            if isinstance(prompt, str):
                self.last = reports[0]
                self.last.ttft_s = clock.ttft_s
            else:
                self.last = GenerationReport(ttft_s=clock.ttft_s, injected=all(r.injected for r in reports),
                                             prompt_tokens=inputs["input_ids"].shape[1], rows=reports,
                                             adapter_refused=refused)
        for r in recalled:  # after the answer, not before its first token
            if r is not None:
                self.recall.after_answer(r)
        return out

    def _stale_adapter(self, recalled) -> list[dict]:
        """Why the active AdapterCube must not answer this request (empty: it may): with a store attached, an
        adapter that records what it learned (``meta["derived_from"]``, e.g. `kvmem.distill`) is refused when one
        of those memories was deleted or expired, or edited and retrieved by this request in its new version."""
        cube = self.adapters.active
        if cube is None or self.recall is None or not cube.meta.get("derived_from"):
            return []
        reasons = []
        for row in recalled:
            reasons += [r for r in self.recall.check_adapter(cube.meta, row) if r not in reasons]
        if reasons:
            _log.warning("adapter %s not used for this request: it learned %s", cube.name,
                         ", ".join(f"{r['memory']} ({r['reason']})" for r in reasons))
        return reasons

    @staticmethod
    def _rows(prompt, cubes) -> tuple[list[str], list]:
        """The prompts as a list, and per prompt its cubes (a list, None, or "auto")."""
        if isinstance(cubes, str) and cubes != "auto":
            raise CubeError(f"cubes must be MemCubes, None or 'auto', got {cubes!r}")
        if isinstance(prompt, str):
            return [prompt], [cubes]
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise CubeError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
        n = len(prompt)
        rows = [cubes] * n if cubes is None or isinstance(cubes, str) else cubes
        if not isinstance(rows, (list, tuple)) or len(rows) != n:
            raise CubeError(f"with {n} prompts, cubes is None, 'auto' or a list of {n} entries (each a MemCube, a "
                            "list of MemCubes or None)")
        return list(prompt), list(rows)

    def _pad_id(self, kwargs: dict) -> int:
        """The pad id generate uses: the caller's, the model's, the tokenizer's, else EOS (popped from kwargs)."""
        for value in (kwargs.pop("pad_token_id", None), self.model.generation_config.pad_token_id,
                      self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if value is not None:
                return int(value)
        return 0

    def _check_length(self, tokens: int, gen_kwargs: dict, row: int, rows: int) -> None:
        """The prompt, and the prompt with its new tokens, within the model's context (each row of a batch as
        if it were alone)."""
        what = "the prompt (memory + request)" if rows == 1 else f"row {row}'s prompt (memory + request)"
        check_context(self.model, tokens, what, "pass fewer or shorter memories (max_memory_tokens= for cubes='auto')")
        new = gen_kwargs.get("max_new_tokens")
        if new is not None:
            check_context(self.model, tokens + new, f"{what} with max_new_tokens={new}",
                          "ask for fewer new tokens, or pass fewer or shorter memories")

    def _spliced(self, prompts, rows, texts, reports, pad: int, recompute, budget, gen_kwargs: dict) -> dict:
        """generate's inputs with every row's cubes spliced (`prefill_batch`; a batch of one is a plain prefix)."""
        if recompute is None:  # the gate, unless a budget names the default mode's knob
            recompute = "auto" if budget is None else DEFAULT_RECOMPUTE
        knobs = {name: v for name, v in (("recompute", recompute), ("budget", budget)) if v is not None}
        queries = [torch.cat([self.layout.text_ids(t) for t in ts] + [self.request_ids(p)])
                   for p, ts in zip(prompts, texts)]
        for b, (cubes, q) in enumerate(zip(rows, queries)):
            self._check_length(cubes[0].anchor_len + sum(c.num_tokens for c in cubes) + q.numel(), gen_kwargs, b,
                               len(rows))
        width = (max(r[0].anchor_len + sum(c.num_tokens for c in r) for r in rows)
                 + max(q.numel() for q in queries))  # the padded prompt generate starts from
        room = static_room(self.model, width, gen_kwargs) if self.cache == "auto" else None
        static = room is not None and static_capable(self.model)
        batch = prefill_batch(self.model, rows, queries, max_new_tokens=room if static else 1, static=static,
                              pad_token_id=pad, tokenizer=self.tokenizer, **knobs)
        if static:
            gen_kwargs["disable_compile"] = gen_kwargs.pop("disable_compile", "compile_config" not in gen_kwargs)
        elif sequences_per_prompt(self.model, gen_kwargs) > 1:  # beams / several sequences: one copy per row
            batch.cache.batch_repeat_interleave(sequences_per_prompt(self.model, gen_kwargs))
        for b, report in enumerate(reports):
            report.injected, report.spans = True, batch.spans[b]
            report.quantized = quantized_report(rows[b])  # approximate cubes are never silent
            if recompute == "auto" and len(rows[b]) > 1:  # the choice prefill made (the gate is deterministic)
                choice = gate(self.model, len(rows[b]), default=(DEFAULT_RECOMPUTE,
                                                                  RECOMPUTE_MODES[DEFAULT_RECOMPUTE][0]))
                report.composition = f"{choice.mode}: {choice.reason}"
            report.prefilled_tokens = queries[b].numel()
            report.prompt_tokens = batch.prompt_tokens[b]  # a host int: no read of the mask
        return batch.generate_kwargs(self.model)

    def _full(self, prompts, rows, texts, reports, pad: int, gen_kwargs: dict) -> dict:
        """generate's inputs with every row prefilled in full, left-padded as transformers pads a batch."""
        full = [self.layout.prompt_ids(p, c, t)[0] for p, c, t in zip(prompts, rows, texts)]
        for b, row in enumerate(full):
            self._check_length(len(row), gen_kwargs, b, len(full))
        ids = torch.full((len(full), max(map(len, full))), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, row in enumerate(full):
            ids[b, ids.shape[1] - len(row):], mask[b, ids.shape[1] - len(row):] = row, 1
            reports[b].prompt_tokens = reports[b].prefilled_tokens = len(row)
        device = model_device(self.model)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def answer(self, prompt: str | list[str], cubes=None, **kwargs) -> str | list[str]:
        """`generate`, decoded: the new text only (a list of them for a list of prompts)."""
        kwargs.setdefault("max_new_tokens", 64)
        kwargs.setdefault("do_sample", False)
        out = self.generate(prompt, cubes, **kwargs)
        seq = out.sequences if hasattr(out, "sequences") else out
        texts = [self.tokenizer.decode(row[self.last.prompt_tokens:], skip_special_tokens=True).strip() for row in seq]
        return texts if isinstance(prompt, (list, tuple)) else texts[0]

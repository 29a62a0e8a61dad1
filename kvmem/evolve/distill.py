"""Context distillation: learn memories into a LoRA AdapterCube, so the model answers about them with no memory
in its context (parametric memory; no prefill at all).

Teacher: the model with one memory injected as a cube (`kvmem.inject.batch.prefill_batch`, the cube path of
batched requests; exact for one cube), answering questions generated from that memory's text
(kvmem/evolve/questions.py); its greedy answer and its full next-token distribution at every answer token are
recorded once. Student: the same model plus a LoRA (PEFT),
shown only the question (anchor | request, the prompt ``mm.generate`` builds with no cubes). Loss:
KL(teacher || student) over the whole vocabulary at every answer token, a weighted mean over the answer tokens of
a batch (a token that states the memory, one of its names or values, weighs ``content_weight``; the rest 1); at
those tokens the teacher's distribution is sharpened (``content_temperature``).
Unrelated prompts (`questions.KEEP_PROMPTS`, repeated up to ``keep_share`` of the examples, each repeat another answer
sampled from the base model) are mixed in with the base model as their teacher, so the adapter keeps the base's
answers elsewhere.

Shapes: a batch is B examples right-padded to T tokens: ids [B, T]; student logits [B, T, V]; each example's
teacher log-probs [A, V] for its A answer tokens (float16 on the CPU: 20 memories x 12 questions x 24 tokens x
49k vocabulary is ~0.5 GB).

Determinism: the batch of step s is a function of (seed, s) alone and the LoRA has no dropout, so a run resumed
from a checkpoint (LoRA + optimizer state + step, kvmem/evolve/checkpoint.py) repeats the uninterrupted run's
updates exactly (as far as torch's CPU kernels are deterministic; they are for these ops).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass

import torch

from ..cubes.adaptercube import AdapterCube, _peft
from ..cubes.fingerprint import fingerprint_fields, fingerprint_id
from ..cubes.memcube import MemCube
from ..errors import CubeError
from ..inject.batch import prefill_batch
from ..model.devices import model_device
from ..model.facts import switch_attention
from ..prompt import ChatLayout
from ..store.lineage import DERIVED_KEY, source_entry
from .checkpoint import load_checkpoint, save_checkpoint
from .questions import KEEP_PROMPTS, ask, content_tokens, states_memory
from .schedule import lr_factor

_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Example:
    """One training row: the student's ids (anchor | request | answer) and the teacher's answer distributions."""

    ids: torch.Tensor        # LongTensor [n]
    start: int               # index in ids of the first answer token
    teacher: torch.Tensor    # float16 [A, V]: teacher log-probs of answer tokens ids[start:start+A]
    source: int              # the memory's index in ``memories``; -1 for a keep prompt
    weights: torch.Tensor | None = None  # float32 [A]: each answer token's weight in the loss (None: all 1)


def _texts_and_sources(memories) -> tuple[list[str], list[dict]]:
    """``memories`` (store Records, or plain strings) -> (texts, lineage entries of the Records)."""
    if isinstance(memories, (str, bytes)) or not hasattr(memories, "__iter__"):
        raise CubeError("memories must be a list of memory texts or store records (view.ls() / view.get(id)), "
                        f"got {type(memories).__name__}")
    texts, sources = [], []
    for m in memories:
        text = m if isinstance(m, str) else getattr(m, "text", None)
        if not isinstance(text, str) or not text.strip():
            raise CubeError(f"each memory must be a non-empty text or a store record, got {m!r:.60}")
        texts.append(text)
        if not isinstance(m, str):
            sources.append(source_entry(m))
    if not texts:
        raise CubeError("distill needs at least one memory to learn")
    return texts, sources


def _check_options(steps, time_budget, rank, seed, lr, batch_size, checkpoint_every, resume, checkpoint_dir):
    def positive_int(value, what):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CubeError(f"{what} must be an int >= 1, got {value!r}")

    if steps is None and time_budget is None:
        raise CubeError("pass steps= (optimizer steps) or time_budget= (seconds), or both: distill needs a budget")
    if steps is not None:
        positive_int(steps, "steps")
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                    or not time_budget > 0):
        raise CubeError(f"time_budget must be a number of seconds > 0, got {time_budget!r}")
    positive_int(rank, "rank")
    positive_int(batch_size, "batch_size")
    positive_int(checkpoint_every, "checkpoint_every")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CubeError(f"seed must be an int, got {seed!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise CubeError(f"lr must be a learning rate in (0, 1), got {lr!r}")
    if resume and checkpoint_dir is None:
        raise CubeError("resume=True needs checkpoint_dir= (the folder an earlier run saved its checkpoints in)")


def _targets(model, target_modules) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if target_modules is None:
        found = [n for n in _LINEAR_NAMES if n in names]
        if not found:
            raise CubeError("cannot find the attention / MLP projections (q_proj ... down_proj) in this model; pass "
                            "target_modules=[...] with the names of its linear layers")
        return found
    missing = [t for t in target_modules if t not in names]
    if missing or not target_modules:
        raise CubeError(f"target_modules {missing or target_modules} are not linear layers of this model; it has "
                        f"{sorted(names)[:12]}")
    return list(target_modules)


@torch.no_grad()
def _answers(model, inputs: dict, *, max_answer_tokens: int, eos: list[int], pad: int, sample_seed=None):
    """The model's greedy answers to a left-padded batch (``inputs``: generate's input_ids, attention_mask and
    perhaps a cache), or answers sampled (temperature 1, top-p 0.9, torch seeded with ``sample_seed``, the
    caller's random state left as it was) when ``sample_seed`` is an int, and its log-probs (of the unmodified
    logits) at each answer token: per row (LongTensor [A], float16 [A, V]), the answer cut after its first
    end-of-sequence token."""
    width = inputs["input_ids"].shape[1]
    how = (dict(do_sample=False, temperature=None, top_p=None, top_k=None) if sample_seed is None
           else dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=None))
    cuda = inputs["input_ids"].device.type == "cuda"  # manual_seed reseeds every CUDA device too: fork them all
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        if sample_seed is not None:
            torch.manual_seed(sample_seed)
        out = model.generate(**inputs, max_new_tokens=max_answer_tokens, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=eos or None, pad_token_id=pad, **how)
    logits = torch.stack(out.logits, 1)  # [B, A_max, V]
    rows = []
    for b in range(out.sequences.shape[0]):
        answer = out.sequences[b, width:].cpu()
        ends = [i for i, t in enumerate(answer.tolist()) if t in eos]
        n = ends[0] + 1 if ends else answer.numel()
        rows.append((answer[:n], torch.log_softmax(logits[b, :n].float(), -1).to(torch.float16).cpu()))
    return rows


def _left_pad(rows: list[torch.Tensor], pad: int, device) -> dict:
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - r.numel():], mask[b, width - r.numel():] = r, 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def make_examples(model, tokenizer, texts: list[str], *, layout: ChatLayout, questions_per_memory: int, seed: int,
                  max_answer_tokens: int, keep_prompts, progress: bool = False, rows: int = 32,
                  content_weight: float = 1.0, sampled_share: float = 0.0, grounded: bool = False,
                  content_temperature: float = 1.0, keep_samples: int = 0) -> list[Example]:
    """The teacher's side: each memory's questions answered with the memory injected as a cube; the keep prompts
    answered by the base model without memory. Answers are generated ``rows`` requests at a time (on a CPU a
    decoding step costs about the same for 1 row as for 30: reading the weights dominates). An answer token that
    is one of its memory's content tokens (`content_tokens`: the names and values it states) weighs
    ``content_weight`` in the loss, the others 1: most answer tokens are phrasing the base model already has,
    and a mean over them would drown the few that carry the memory. A ``sampled_share`` of each memory's
    questions (spread evenly over them) get a sampled answer instead of the greedy one: the memory's values then
    come in more of the sentence shapes the model states them in, not one per question. ``grounded``: a memory's
    answer that states nothing of it (`questions.states_memory`: the value a fact question asks for, else a word
    of the memory the question did not say) is left out: the teacher invents as often as it reads the memory.
    ``keep_samples``: after the keep prompts' greedy answers, that many more rounds of answers to them sampled
    from the base model (as ``sampled_share``'s are), each round seeded apart.
    ``content_temperature``: at a memory answer's tokens that state the memory (its content tokens, those
    ``content_weight`` weighs) the teacher's distribution is taken at this temperature (`sharpened`; below 1 it
    is peakier: the student is pushed to put the memory's value first, not merely among its likely tokens); the
    phrasing around them and the keep prompts keep the teacher's and the base model's own distributions."""
    from tqdm.auto import tqdm

    device = model_device(model)
    eos = sorted({t for t in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None))
                  if isinstance(t, int)})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    anchor = layout.anchor_ids()
    # (memory, its question's index, request ids, (question, the value its answer has to state))
    asked = [(i, j, layout.request_ids(q), (q, v)) for i, text in enumerate(texts)
             for j, (q, v) in enumerate(ask(text, per_memory=questions_per_memory, seed=seed + i))]
    # question j of a memory is sampled when the share's running count steps up at j (share 0.5: every other)
    sampled = [int((j + 1) * sampled_share) > int(j * sampled_share) for _, j, _, _ in asked]
    greedy = [(i, r, w) for (i, _, r, w), s in zip(asked, sampled) if not s]
    drawn = [(i, r, w) for (i, _, r, w), s in zip(asked, sampled) if s]
    keep = [(-1, layout.request_ids(q), (q, None)) for q in keep_prompts]
    # the keep prompts' greedy answers, then ``keep_samples`` rounds of answers drawn from the base model
    chunks = [(jobs[k:k + rows], sample) for jobs, sample in ((greedy, False), (drawn, True), (keep, False),
                                                              *((keep, True),) * keep_samples)
              for k in range(0, len(jobs), rows)]
    cubes = [MemCube.from_text(model, tokenizer, text, anchor=layout.anchor) for text in texts]
    content = [content_tokens(tokenizer, text) for text in texts]
    out = []
    for n, (chunk, sample) in enumerate(tqdm(chunks, desc="kvmem distill: teacher answers", disable=not progress,
                                             leave=False)):
        requests = [r for _, r, _ in chunk]
        if chunk[0][0] >= 0:
            batch = prefill_batch(model, [cubes[source] for source, _, _ in chunk], requests,
                                  max_new_tokens=max_answer_tokens, static=False, pad_token_id=pad)
            inputs = batch.generate_kwargs(model)
        else:
            inputs = _left_pad([torch.cat([anchor, r]) for r in requests], pad, device)
        answers = _answers(model, inputs, max_answer_tokens=max_answer_tokens, eos=eos, pad=pad,
                           sample_seed=seed * 1_000_003 + n if sample else None)
        for (source, request, (question, value)), (answer, logp) in zip(chunk, answers):
            if grounded and source >= 0 and not states_memory(tokenizer.decode(answer, skip_special_tokens=True),
                                                              memory=texts[source], question=question, value=value):
                continue
            if answer.numel():
                weights = None
                if source >= 0:  # the answer tokens that state the memory: weighted, and sharpened
                    states = torch.tensor([t in content[source] for t in answer.tolist()])
                    if content_weight != 1.0:
                        weights = torch.where(states, content_weight, 1.0)
                    if content_temperature != 1.0:
                        logp = torch.where(states[:, None], sharpened(logp, content_temperature), logp)
                out.append(Example(torch.cat([anchor, request, answer]), len(anchor) + len(request), logp, source,
                                   weights))
    if not any(e.source >= 0 for e in out):
        raise CubeError("the teacher gave no answer to any question about the memories"
                        + (" that states something of them (grounded=True)" if grounded else "") + "; nothing to learn")
    return out


def sharpened(logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs ``logp`` [A, V] (float16) at ``temperature``: log_softmax(logp / temperature), as float16."""
    return torch.log_softmax(logp.float() / temperature, -1).to(torch.float16)


def keep_copies(learn: int, keep: int, share: float) -> int:
    """How many times ``keep`` keep-prompt examples are taken so that they are at least ``share`` of them plus
    ``learn`` memory examples (1: once, no repeats)."""
    if not keep or share <= 0 or keep >= share * (learn + keep):
        return 1
    return math.ceil(share * learn / ((1 - share) * keep))


def with_keep_share(examples: list[Example], share: float) -> list[Example]:
    """``examples`` with the keep-prompt ones (source -1) repeated until they are at least ``share`` of all."""
    keep = [e for e in examples if e.source < 0]
    copies = keep_copies(len(examples) - len(keep), len(keep), share)
    if copies == 1:
        return examples
    return [e for e in examples if e.source >= 0] + keep * copies


def batch_indices(n: int, *, step: int, batch_size: int, seed: int) -> list[int]:
    """The examples of optimizer step ``step`` (0-based): epochs of a seeded permutation, a function of
    (seed, step) alone, so a resumed run draws the same batches."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(order[pos]))
    return out


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do)."""
    import inspect

    from ..model.facts import base_model

    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


def kl_loss(model, batch: list[Example], *, pad: int) -> torch.Tensor:
    """Mean over the batch's answer tokens of KL(teacher || student), nats (a 0-dim tensor with grad), each
    token weighted by its example's ``weights`` (a weighted mean)."""
    device = model_device(model)
    width = max(e.ids.numel() for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(batch):
        ids[b, :e.ids.numel()], mask[b, :e.ids.numel()] = e.ids, 1
    # the logits at position p predict token p + 1: the answers are predicted from positions start - 1 on; only
    # those positions go through the LM head (its 49k-wide output is a fifth of a small model's work)
    first = min(e.start for e in batch) - 1
    last = max(e.start - 1 + e.teacher.shape[0] for e in batch)
    kwargs = {"logits_to_keep": torch.arange(first, last, device=device)} if _keeps_logits(model) else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits  # [B, T', V]
    offset = first if kwargs else 0
    # every answer position of the batch in one gather: indexing each example's slice separately cost one
    # zero-filled [B, T', V] gradient per example in the backward pass (~4% of a SmolLM2 step, profiled)
    lengths = [e.teacher.shape[0] for e in batch]
    rows = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(lengths))
    cols = torch.cat([torch.arange(e.start - 1 - offset, e.start - 1 - offset + a) for e, a in zip(batch, lengths)])
    student = torch.log_softmax(logits[rows.to(device), cols.to(device)].float(), -1)  # [N, V]
    # float32 before the cat: under CPU autocast torch.cat of float16 tensors raises
    teacher = torch.cat([e.teacher.to(device=student.device, dtype=torch.float32) for e in batch])
    per_token = (teacher.exp() * (teacher - student)).sum(-1)  # [N]
    weights = torch.cat([e.weights if e.weights is not None else torch.ones(a) for e, a in zip(batch, lengths)])
    weights = weights.to(device=per_token.device, dtype=per_token.dtype)
    return (weights * per_token).sum() / weights.sum()


def train_step(student, optimizer, batch: list[Example], *, pad: int, precision: str = "float32") -> float:
    """One optimizer step of ``student`` on ``batch`` (`kl_loss`); ``precision`` "bfloat16" on a float32 model runs
    its matmuls under torch.autocast (the LM head excepted: `make_student`), anything else in the model's own dtype.
    Returns the batch's loss before the step."""
    device = model_device(student)
    cast = _autocasts(student, precision)
    with torch.autocast(device.type, dtype=torch.bfloat16) if cast else contextlib.nullcontext():
        loss = kl_loss(student, batch, pad=pad)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _autocasts(model, precision: str) -> bool:
    """Whether training ``model`` in ``precision`` runs under bfloat16 autocast: "bfloat16" asked of a float32
    model (a model of another dtype trains in its own, `train_precision`)."""
    return precision == "bfloat16" and model.get_input_embeddings().weight.dtype == torch.float32


def training_attention(model) -> str:
    """The attention implementation the student trains with: "eager" for a model on a CPU that uses torch's sdpa
    (transformers' "sdpa", or the "kvmem_sdpa" a `kvmem.wrap`-ped model of grouped heads serves with), else the
    model's own. Distillation rows are short (a question and an answer of tens of tokens), and there torch's CPU
    flash-attention backward costs more than the eager attention's few small matmuls: a SmolLM2 step took 0.84x
    the time with eager attention (bench/distill_step.py, one process). Both compute the same attention: the loss
    and its gradient agree to float rounding."""
    from ..model.attention import NAME as KVMEM_SDPA

    own = getattr(model.config, "_attn_implementation", None)
    return "eager" if own in ("sdpa", KVMEM_SDPA) and model_device(model).type == "cpu" else own


def make_student(model, *, rank: int, targets: list[str], precision: str, attention: str | None = None):
    """``model`` (a frozen copy: `bare_copy`) with a LoRA of ``rank`` on ``targets`` (PEFT, alpha 2 * rank, no
    dropout), initialised from torch's current seed, computing its attention with ``attention`` (default
    `training_attention`; the copy's config is changed, not the caller's model). For "bfloat16" training of a
    float32 model (`_autocasts`) its LM head computes in float32 outside the autocast: the KL compares full
    distributions, and logits rounded to bfloat16 (8 bits of mantissa: +-0.06 nats at logits of 16-32) would be
    noise of the size of the losses it learns from."""
    attention = attention or training_attention(model)
    if attention != getattr(model.config, "_attn_implementation", None):
        switch_attention(model, attention, fix="pass attention= with one the model supports (or None)")
    if _autocasts(model, precision):
        head = model.get_output_embeddings()
        forward = head.forward

        def float32_forward(hidden, *args, **kwargs):
            with torch.autocast(hidden.device.type, enabled=False):
                return forward(hidden.float(), *args, **kwargs)

        head.forward = float32_forward
    peft = _peft()
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                      target_modules=targets, bias="none"))


def _run_key(model, texts, options: dict) -> str:
    fields = fingerprint_fields(model)
    fields["adapter"] = None
    doc = {"base": fingerprint_id(fields), "texts": [hashlib.sha256(t.encode()).hexdigest() for t in texts],
           **options}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def distill(model, tokenizer, memories, *, steps: int | None = None, time_budget: float | None = None,
            rank: int = 8, seed: int = 0, lr: float = 2e-3, batch_size: int = 8, questions_per_memory: int = 16,
            max_answer_tokens: int = 24, content_weight: float = 3.0, keep_prompts=KEEP_PROMPTS,
            keep_share: float = 0.2, target_modules=None,
            system_prompt: str | None = None, name: str | None = None, checkpoint_dir=None,
            checkpoint_every: int = 20, resume: bool = False, progress: bool = True,
            lr_schedule: str = "wsd", warmup: float = 0.05, sampled_share: float = 0.0,
            grounded: bool = False, weight_average: float = 0.0, precision: str = "auto",
            content_temperature: float = 0.5, keep_answers: str = "sampled") -> AdapterCube:
    """Learn ``memories`` into a LoRA AdapterCube by context distillation (see the module docstring).

    Args:
        model: a transformers causal LM (not a PeftModel: pass ``mm.adapters.base``). It is never changed:
            training runs on a copy (`bare_copy`), so a model that serves requests meanwhile is not disturbed.
        tokenizer: its tokenizer (the chat template lays out the prompts as ``kvmem.wrap`` does).
        memories: store records (``view.ls()``, ``view.get(id)``: their lineage goes into the cube) or texts.
        steps: optimizer steps; time_budget: seconds for the whole call; training stops at whichever comes first.
        rank: LoRA rank (alpha = 2 * rank, no dropout); seed: questions, LoRA init and batch order.
        lr, batch_size: AdamW (peak) learning rate and examples per step.
        lr_schedule: "wsd" (the default: warm-up over the first ``warmup`` share of the run, the peak ``lr``,
            then a linear decay to a tenth over the last `schedule.WSD_DECAY` of it), "constant" or "cosine" (the
            warm-up, then a cosine decay to a tenth). The run's progress is its share of ``steps`` or of
            ``time_budget``, whichever is further on, so a run stopped by its time budget has decayed too. On
            bench/distill_validate.py at 160 steps "wsd" answered 74% of what the cube answers (damage 0.044
            nats), "constant" 72% (0.072), "cosine" 66% (0.050). The default with ``keep_answers="sampled"``
            since on bench/distill.py the damage of a constant lr ranged 0.047-0.063 nats, over the 0.05
            target in two runs of three: see ``keep_answers`` (bench/README.md).
        questions_per_memory, max_answer_tokens: how many questions per memory, how long the teacher answers.
            32 a memory answered 78% of what the cube answers on the validation at 160 steps, 16 (the default)
            72%, one run each; not kept as the default (see ``lr_schedule``).
        weight_average: 0 (the default): the adapter is the last step's LoRA weights; a decay d in (0, 1): the
            bias-corrected exponential moving average of them over the steps (0.98: about the last 50 steps; it
            averages trained weights only). On bench/distill_validate.py at 320 steps, 0.98 answered 85.9% and
            77.6% of what the cube answers at seeds 0 and 1, against 78.8% and 70.6% without (damage 0.064 / 0.053
            against 0.063 / 0.063 nats); on bench/distill.py, where the 480 s budget stopped it at 200 steps on a
            slower day, 61.5% against 73.1% without at 227 steps: an average lags a run that is still learning, so
            it is not the default (bench/README.md).
        precision: the student's matmuls during training, on a float32 model: "auto" (the default: "bfloat16"
            where the device multiplies it natively, `train_precision`, else "float32"), "float32", or "bfloat16"
            (torch.autocast over the forward and backward, the LM head excepted: the LoRA weights, AdamW's state,
            the logits and the KL stay float32, the teacher's distributions are kept as float16 as always). A
            bfloat16 or float16 model trains in its own dtype. What a run used is in
            ``meta["distill"]["precision"]``. On this repository's 2-core AVX512-BF16 CPU a bfloat16 step took 0.69x
            the time of a float32 one (bench/distill_step.py, one process, both with the eager attention of
            `training_attention`; 0.75x before it); per step the two were within the spread of seeds on the
            validation. Under bench/distill.py's 480 s budget bfloat16 trained 300 and 288 steps
            (seeds 0, 1) and answered 88.5% and 84.6% of what the cube answers (damage 0.047 and 0.063 nats);
            float32 231 steps, 76.9% (0.0525), so "auto" is the default: a time budget buys ~1.3x the steps where
            the hardware has bfloat16 and nothing changes where it has not (bench/README.md).
        content_weight: the loss weight of an answer token that states the memory (its names and values,
            `content_tokens`) relative to the phrasing around it (1.0: a plain mean).
        content_temperature: the temperature of the teacher's distribution at those same tokens (1.0: the
            teacher's own; below 1 sharper, `sharpened`): the student learns to say the memory's value first,
            where the teacher's own distribution, matched in KL, leaves it one likely token among the base's
            phrasing ("lives in the charming town of ..."). The phrasing around them and the keep prompts keep
            their own distributions. On bench/distill_validate.py at 320 steps, 0.5 answered 91.8% and 89.4% of
            what the cube answers at seeds 0 and 1 (cities 34/39 and 31/39) against 78.8% and 70.6% (23/39,
            21/39) at 1.0, damage 0.070 / 0.069 against 0.063 / 0.063 nats; 0.5 at every answer token of the
            memories instead: 80.0% / 80.0%, damage 0.090 / 0.083 (bench/README.md).
        grounded: leave out the teacher's answers that state nothing of their memory (`make_examples`). It
            drops ~40% of them on bench/distill_validate.py and lowers damage (0.068, 0.051 nats against the
            default's 0.072, 0.066 at seeds 0, 1) but answers fewer of the held-apart questions (63.5% and 63.5%
            of what the cube answers against 71.8% and 67.1%): the dropped answers' distributions still carried
            the memory's values. Off by default.
        sampled_share: the share of each memory's questions whose teacher answer is sampled (temperature 1, top-p
            0.9, seeded) rather than greedy (0: all greedy).
        keep_prompts: unrelated prompts whose base answers the adapter keeps (() for none); keep_share: the
            share of the training examples they make up at least (repeated to reach it: more questions about
            memories would otherwise dilute them, and the damage elsewhere grows).
        keep_answers: "sampled" (the default): the keep prompts' greedy answers once, and as many rounds of
            answers sampled from the base model (temperature 1, top-p 0.9, seeded) as the repeats that reach
            ``keep_share`` would have been: the same number of training rows, each along another of the base's own
            answers, so the adapter is held to the base over more of what the base says; "greedy": the repeats are
            copies of the greedy answers. On bench/distill.py (480 s) "sampled" with ``lr_schedule="wsd"``
            answered 84.6% and 88.5% of what the cube answers at seeds 0 and 1, damage 0.044 and 0.033 nats,
            against 88.5% / 84.6%, 0.047 / 0.063 with "greedy" at a constant lr; "sampled" alone 88.5% / 88.5%,
            0.056 / 0.049; rerun at these defaults on a ~10% slower hour (263 and 274 steps) 80.8% / 76.9%,
            damage 0.040 / 0.039 (bench/README.md).
        target_modules: LoRA targets (default: the attention and MLP projections the model has).
        system_prompt: as ``kvmem.wrap(..., system_prompt=)`` (the prompts the adapter will serve).
        name: the cube's name (default ``distilled-<n>-memories``).
        checkpoint_dir: save LoRA + optimizer + step there every ``checkpoint_every`` steps and at the end;
        resume: continue from the checkpoint in ``checkpoint_dir`` (same arguments), if there is one.
        progress: a tqdm bar with the loss.

    Returns:
        An AdapterCube fingerprinted to ``model``; ``meta["derived_from"]`` lists the memory versions it learned
        (records only), ``meta["distill"]`` the run (steps, losses, seconds, questions, options).
    """
    t0 = time.monotonic()
    peft = _peft()
    if isinstance(model, peft.PeftModel):
        raise CubeError("distill takes the base model, not a PeftModel (with a MemoryModel: mm.adapters.base)")
    _check_options(steps, time_budget, rank, seed, lr, batch_size, checkpoint_every, resume, checkpoint_dir)
    if isinstance(content_weight, bool) or not isinstance(content_weight, (int, float)) or not content_weight > 0:
        raise CubeError(f"content_weight must be a number > 0 (1.0: every answer token weighs the same), got "
                        f"{content_weight!r}")
    if isinstance(keep_share, bool) or not isinstance(keep_share, (int, float)) or not 0 <= keep_share < 1:
        raise CubeError(f"keep_share must be a number in [0, 1) (0: no repeats), got {keep_share!r}")
    if lr_schedule not in ("constant", "cosine", "wsd"):
        raise CubeError(f"lr_schedule must be 'constant', 'cosine' or 'wsd', got {lr_schedule!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < 1:
        raise CubeError(f"warmup must be a share of the run in [0, 1), got {warmup!r}")
    if isinstance(sampled_share, bool) or not isinstance(sampled_share, (int, float)) or not 0 <= sampled_share <= 1:
        raise CubeError(f"sampled_share must be a share of the questions in [0, 1] (0: all greedy), got "
                        f"{sampled_share!r}")
    if isinstance(content_temperature, bool) or not isinstance(content_temperature, (int, float)) \
            or not 0 < content_temperature < float("inf"):
        raise CubeError(f"content_temperature must be a number > 0 (1: the teacher's own distributions at the "
                        f"tokens that state the memory, below 1: sharper), got {content_temperature!r:.40}")
    if keep_answers not in ("greedy", "sampled"):
        raise CubeError(f"keep_answers must be 'greedy' or 'sampled', got {keep_answers!r:.40}")
    if not isinstance(grounded, bool):
        raise CubeError(f"grounded must be true or false, got {grounded!r:.40}")
    if isinstance(weight_average, bool) or not isinstance(weight_average, (int, float)) \
            or not 0 <= weight_average < 1:
        raise CubeError(f"weight_average must be an EMA decay in [0, 1) (0: the last step's weights), got "
                        f"{weight_average!r:.40}")
    if precision not in PRECISIONS:
        raise CubeError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r:.40}")
    texts, sources = _texts_and_sources(memories)
    keep_prompts = list(keep_prompts)
    precision = train_precision(model, precision)
    work = bare_copy(model)
    targets = _targets(work, target_modules)
    layout = ChatLayout(tokenizer, system_prompt)
    options = dict(rank=rank, seed=seed, lr=lr, batch_size=batch_size, questions_per_memory=questions_per_memory,
                   max_answer_tokens=max_answer_tokens, content_weight=content_weight,
                   keep_prompts=keep_prompts, keep_share=keep_share, targets=targets,
                   system_prompt=system_prompt, lr_schedule=lr_schedule, warmup=warmup, sampled_share=sampled_share,
                   grounded=grounded, weight_average=weight_average, precision=precision,
                   content_temperature=content_temperature, keep_answers=keep_answers)
    key = _run_key(work, texts, options)
    # "sampled": the keep prompts' repeats (as many as with_keep_share would make) are rounds of sampled answers
    keep_samples = keep_copies(len(texts) * questions_per_memory, len(keep_prompts), keep_share) - 1 \
        if keep_answers == "sampled" else 0
    examples = make_examples(work, tokenizer, texts, layout=layout, questions_per_memory=questions_per_memory,
                             seed=seed, max_answer_tokens=max_answer_tokens, keep_prompts=keep_prompts,
                             progress=progress, content_weight=content_weight, sampled_share=sampled_share,
                             grounded=grounded, content_temperature=content_temperature, keep_samples=keep_samples)
    examples = with_keep_share(examples, keep_share)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(seed)  # the LoRA A matrices' init
    student = make_student(work, rank=rank, targets=targets, precision=precision)
    return _train(student, work, examples, texts, sources, key=key, steps=steps, time_budget=time_budget, t0=t0,
                  lr=lr, batch_size=batch_size, seed=seed, pad=pad, name=name, options=options,
                  checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume, progress=progress)


PRECISIONS = ("auto", "float32", "bfloat16")


def train_precision(model, precision: str) -> str:
    """What the student's matmuls compute in, for ``precision`` ("auto", "float32" or "bfloat16") and ``model``: a
    model that is not float32 trains in its own dtype whatever ``precision`` says (its name is returned:
    "bfloat16", "float16"); a float32 model in "float32" or, under torch.autocast, "bfloat16"; "auto" is
    "bfloat16" where the device multiplies it natively (a CPU with AVX512-BF16 or AMX tiles, an NVIDIA GPU of
    compute capability 8.0 or later, a ROCm GPU with bfloat16) and "float32" elsewhere.

    Raises:
        CubeError: "bfloat16" asked for on a device torch has no autocast for."""
    device = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype != torch.float32:
        return str(dtype).removeprefix("torch.")
    available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))(device.type)
    if precision == "bfloat16" and not available:
        raise CubeError(f"precision='bfloat16' needs torch.autocast, which this torch has not for {device.type!r} "
                        "devices; use precision='float32' (or 'auto')")
    if precision != "auto":
        return precision
    if device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    elif device.type == "cuda":
        native = (torch.cuda.is_bf16_supported() if torch.version.hip
                  else torch.cuda.get_device_capability(device) >= (8, 0))
    else:
        native = False
    return "bfloat16" if native and available else "float32"


def bare_copy(model):
    """A copy of ``model`` to train on, without the LoRA layers a MemoryModel may have injected into it (PEFT
    injects in place: ``mm.adapters.base`` carries them once an adapter was used), frozen, in eval mode. Training
    a copy leaves the serving model untouched, also while it answers requests in another thread."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    clone = copy.deepcopy(model)
    for module in list(clone.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(module, child_name, child.get_base_layer())
    clone.requires_grad_(False)
    return clone.eval()


def _train(student, model, examples, texts, sources, *, key, steps, time_budget, t0, lr, batch_size, seed, pad,
           name, options, checkpoint_dir, checkpoint_every, resume, progress) -> AdapterCube:
    peft = _peft()
    from tqdm.auto import tqdm

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    decay = options.get("weight_average", 0.0)
    # the exponential moving average of the LoRA weights over the steps (weight_average), bias-corrected (it starts
    # at zero and is divided by 1 - decay ** steps, as Adam's moments are): the trained weights only, never the
    # initial ones, so a short run's average is not pulled toward its untrained start
    averaged = [torch.zeros_like(p) for p in params] if decay else None
    step, losses = 0, []
    state = load_checkpoint(checkpoint_dir, key=key) if resume else None
    if state is not None:
        peft.set_peft_model_state_dict(student, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses = state["step"], state["losses"]
        if averaged is not None:
            averaged = [t.clone() for t in state["averaged"]]
    first_step = step

    def save():
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, lora=peft.get_peft_model_state_dict(student),
                            optimizer=optimizer.state_dict(), step=step, key=key, losses=losses,
                            averaged=averaged)

    stopped = "steps"
    # the time the teacher's answers left for training: the schedule's clock when only a time budget stops the run
    t_train, train_budget = time.monotonic(), None if time_budget is None else time_budget - (time.monotonic() - t0)
    bar = tqdm(total=steps, initial=step, desc="kvmem distill", disable=not progress)
    try:
        while steps is None or step < steps:
            if time_budget is not None and time.monotonic() - t0 >= time_budget:
                stopped = "time_budget"
                break
            done = max(step / steps if steps is not None else 0.0,
                       (time.monotonic() - t_train) / train_budget if train_budget and train_budget > 0 else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(done, schedule=options["lr_schedule"], warmup=options["warmup"])
            batch = [examples[i] for i in batch_indices(len(examples), step=step, batch_size=batch_size, seed=seed)]
            loss = train_step(student, optimizer, batch, pad=pad, precision=options["precision"])
            if averaged is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - decay)
            step += 1
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % checkpoint_every == 0:
                save()
    finally:
        bar.close()
    save()
    if not losses:
        raise CubeError(f"the time budget ({time_budget} s) ran out before the first training step (the teacher's "
                        "answers took it); give distill more time or fewer questions")
    student.eval()
    if averaged is not None:  # the adapter is the average, not the last step's weights
        with torch.no_grad():
            for p, a in zip(params, averaged):
                p.copy_(a / (1 - decay ** step))
    cube = AdapterCube.from_peft(student, name or f"distilled-{len(texts)}-memories", base_model=model)
    meta = cube.meta
    meta[DERIVED_KEY] = sources
    train_s = time.monotonic() - t_train
    meta["distill"] = {"steps": step, "stopped": stopped, "seconds": round(time.monotonic() - t0, 3),
                       "teacher_seconds": round(t_train - t0, 3), "train_seconds": round(train_s, 3),
                       "steps_per_s": round((step - first_step) / train_s, 4) if train_s > 0 else None,
                       "losses": losses, "memories": len(texts),
                       "examples": sum(e.source >= 0 for e in examples),
                       "keep_examples": len({id(e) for e in examples if e.source < 0}),
                       "attention": getattr(model.config, "_attn_implementation", None),
                       **{k: v for k, v in options.items() if k != "keep_prompts"}}
    return AdapterCube(cube.state_dict, meta)

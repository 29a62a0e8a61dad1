"""kvmem.calibrate: measure how far composed cubes drift from a full prefill on one model, and save it for the gate.

For 2, 4 and 8 cubes and each composition setting, on texts it generates (invented colleagues described over
several paragraphs, one document per cube, as a user splits notes by document) or texts the user gives (one cube
each), it measures against a full prefill of the same ids:

- KL: mean next-token KL(full || composed) in nats, teacher-forced along the full prefill's greedy answer
  (``answer_tokens`` tokens), averaged over questions;
- agreement: the fraction of questions whose greedy answer equals the full prefill's, token for token (read off
  the teacher-forced logits: the composed greedy answer is the full prefill's exactly when each forced position's
  argmax is the full prefill's token, so only the full prefill's answer is decoded);
- TTFT: `kvmem.prefill` plus the question's forward, against the full prefill's forward over the same ids (the
  memory's ids, then the question's: transformers' prefix reuse, the same computation; medians).

The result is a JSON file keyed by the model's fingerprint and dtype (`kvmem.inject.gate.calibration_path`);
`kvmem.prefill(recompute="auto")` (the default) and ``cubes="auto"`` then use the cheapest setting that meets the
target and prefill as text where none does.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cubes.fingerprint import fingerprint_fields, fingerprint_id
from ..cubes.memcube import MemCube
from ..errors import CubeError
from ..model.cache import cache_kwarg, output_cache
from ..model.devices import dtype_device
from ..model.facts import eval_mode
from ..timing import sync
from .gate import CALIBRATION_VERSION, DEFAULT_TARGET, Target, calibration_path, choose, label
from .prefill import prefill

# (mode, budget) measured by default, cheapest first
DEFAULT_SETTINGS = (("none", None), ("leading", 32), ("blend", 64), ("query", 64), ("leading", 128),
                    ("selective", 0.15))
# opt-in settings with the APE attention adjustment: (mode, budget, (temperature, scale, decode)); measured by
# bench/compose_fidelity.py; the gate never picks them (prefill cannot apply an adjustment that lives in generate).
# T = 1, S = 0.6: a sweep (bench/results/compose_fidelity_ape_sweep.txt) found any T != 1 worse on both real models
# and S < 1 slightly better; 0.9/0.9 stands for APE's own (T < 1) regime
APE_SETTINGS = (("none", None, (1.0, 0.6, True)), ("none", None, (0.9, 0.9, True)), ("leading", 32, (1.0, 0.6, True)),
                ("query", 64, (1.0, 0.6, True)))


def setting_label(setting) -> str:
    """``leading@32``, ``query@64``, ``leading@32+ape0.9/0.9`` (``...q``: the query's tokens only, not decoding)."""
    mode, budget, *rest = setting
    text = label(mode, budget)
    if rest and rest[0]:
        t, s, decode = rest[0]
        text += f"+ape{t:g}/{s:g}" + ("" if decode else "q")
    return text

_FIRST = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kavya", "Lars",
          "Mina", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tove", "Umar", "Vera", "Wen", "Xavier", "Yara",
          "Zeno", "Amara", "Bodil", "Cyril", "Dagny", "Emil", "Fiona", "Gustav", "Hanna", "Ivo", "Jule", "Kenji",
          "Lotte", "Marek", "Nadia", "Oskar", "Priya", "Rafael", "Signe", "Tomas", "Ulla", "Viktor", "Wanda"]
_LAST = ["Moreau", "Lindqvist", "Okafor", "Tanaka", "Rossi", "Novak", "Haddad", "Berg", "Silva", "Kowalski",
         "Ivanova", "Fischer", "Nakamura", "Costa", "Dubois", "Horvath", "Jensen", "Kaur", "Larsen", "Mendes"]
_CITIES = ["Oslo", "Lisbon", "Tallinn", "Porto", "Bergen", "Ghent", "Krakow", "Lyon", "Turin", "Graz", "Aarhus",
           "Bilbao", "Utrecht", "Brno", "Tampere", "Split", "Malmo", "Leipzig", "Cork", "Basel"]
_JOBS = ["baker", "marine biologist", "pilot", "violin maker", "data engineer", "beekeeper", "architect",
         "glassblower", "nurse", "cartographer", "chef", "translator", "locksmith", "astronomer", "librarian"]
_HOBBIES = ["climbing", "chess", "sailing", "pottery", "birdwatching", "running", "baking sourdough", "kayaking",
            "restoring old radios", "playing the cello", "growing tomatoes", "painting lighthouses"]
_PROJECTS = ["the harbour sensor network", "the new billing system", "the archive migration", "the winter survey",
             "the mobile app redesign", "the supplier audit", "the solar roof pilot"]


def _paragraph(rng: random.Random, first: str, last: str) -> tuple[str, dict]:
    fact = {"name": f"{first} {last}", "city": rng.choice(_CITIES), "job": rng.choice(_JOBS)}
    project, hobby, year = rng.choice(_PROJECTS), rng.choice(_HOBBIES), rng.randint(2009, 2024)
    text = (f"{first} {last} lives in {fact['city']} and works as a {fact['job']}. Since joining in {year}, "
            f"{first} has spent most of the time on {project}, and colleagues say the weekly notes of {first} are "
            f"the clearest in the team. Outside work {first} likes {hobby}.\n\n")
    return text, fact


def invented_documents(tokenizer, n_docs: int, tokens_per_doc: int, *, seed: int = 0) -> list[tuple[str, list]]:
    """``n_docs`` documents of about ``tokens_per_doc`` tokens each: a heading and paragraphs about invented
    colleagues (facts no model knows), with first names unique across all documents. Returns [(text, facts)]."""
    rng = random.Random(seed)
    names = [(f, l) for f in _FIRST for l in _LAST]
    rng.shuffle(names)
    seen, people = set(), []
    for f, l in names:
        if f not in seen:
            seen.add(f)
            people.append((f, l))
    docs = []
    for d in range(n_docs):
        text, facts = f"Team notes, part {d + 1}: {rng.choice(_CITIES)} office.\n\n", []
        while len(tokenizer(text, add_special_tokens=False).input_ids) < tokens_per_doc:
            first, last = people.pop() if people else (f"Person{rng.randint(100, 999)}", rng.choice(_LAST))
            paragraph, fact = _paragraph(rng, first, last)
            text += paragraph
            facts.append(fact)
        docs.append((text, facts))
    return docs


def invented_questions(sets_facts: list[list], rng: random.Random, n: int) -> list[str]:
    """``n`` questions about a later cube (where composition can go wrong) and, every third, across two cubes."""
    out = []
    for i in range(n):
        later = rng.randrange(1, len(sets_facts)) if len(sets_facts) > 1 else 0
        facts = sets_facts[later] or [{"name": "the team"}]
        person = rng.choice(facts)
        if i % 3 == 2 and sets_facts[0]:
            other = rng.choice(sets_facts[0])
            out.append(f"Do {other['name']} and {person['name']} live in the same city?")
        elif i % 2:
            out.append(f"What does {person['name']} work as?")
        else:
            out.append(f"Where does {person['name']} live?")
    return out


def query_ids(tokenizer, question: str) -> torch.Tensor:
    """[q] the ids of a calibration question as it follows the cubes: "\\nQuestion: ...\\nAnswer:"."""
    return torch.tensor(tokenizer(f"\nQuestion: {question}\nAnswer:", add_special_tokens=False).input_ids)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over positions of KL(p || q) in nats between the rows' softmax distributions ([n, vocab] each)."""
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _eos_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _forward(model, cache, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """[keep, vocab]: the last ``keep`` logits of ``ids`` [n] run over ``cache`` (which grows by n)."""
    with torch.inference_mode():
        out = model(input_ids=ids[None], use_cache=True, logits_to_keep=keep, **{cache_kwarg(model): cache})
    return out.logits[0]


def _timed_first(model, cache, query: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """(the logits after ``query`` [vocab], seconds of the query's forward over ``cache``: the first token's time)."""
    sync(device)
    t0 = time.perf_counter()
    logits = _forward(model, cache, query, 1)[-1]
    sync(device)
    return logits, time.perf_counter() - t0


def _greedy(model, cache, query: torch.Tensor, n: int, eos: set[int], device):
    """The greedy answer after ``query`` over ``cache``: (tokens [n'], their logits [n', vocab], seconds to the
    first token's logits). Raw argmax, as generate(do_sample=False) without logits processors; stops after EOS."""
    logits, ttft = _timed_first(model, cache, query, device)
    tokens, rows = [], []
    while True:
        token = logits.argmax()
        tokens.append(token)
        rows.append(logits)
        if len(tokens) == n or int(token) in eos:
            break
        logits = _forward(model, cache, token[None], 1)[-1]
    return torch.stack(tokens), torch.stack(rows), ttft


def _forced(model, cache, query: torch.Tensor, answer: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """([len(answer), vocab] the logits predicting each answer token, ``query`` then ``answer`` run over ``cache``
    (teacher-forced); seconds to the first of them, the query's forward alone, as a request's first token)."""
    first, ttft = _timed_first(model, cache, query, device)
    if answer.numel() == 1:
        return first[None], ttft
    return torch.cat([first[None], _forward(model, cache, answer[:-1], answer.numel() - 1)]), ttft


def _adjust(prefix, model, ape, query: torch.Tensor):
    """The APE adjustment of a setting for one request (a no-op context without one)."""
    if not ape:
        return contextlib.nullcontext()
    t, s, decode = ape
    return prefix.adjusted(model, temperature=t, scale=s, decode=decode, query_len=query.numel())


def _fails(rows: list[dict], total: int, target: Target) -> bool:
    """Whether ``rows`` (some of a setting's ``total`` questions) already miss ``target`` whatever the rest
    measure: KL is >= 0, so a sum above the target's share cannot average below it; the misses so far cap the
    agreement."""
    misses = sum(not r["same"] for r in rows)
    return sum(r["kl"] for r in rows) > target.kl * total or (total - misses) / total < target.agreement


def _all_fail(failed: dict | None, settings, total: int, target: Target) -> bool:
    """Whether every setting already misses ``target`` at this count (stopping early): a set would measure nothing."""
    return failed is not None and all(_fails(failed.get(s, []), total, target) for s in settings)


def _measure_set(model, cubes, queries, settings, *, answer_tokens: int, device, eos: set[int],
                 failed: dict | None = None, total: int = 0, target: Target = DEFAULT_TARGET) -> list[dict]:
    """Per setting, per question: KL, agreement and TTFT of the composed prefix against the full prefill.

    The full prefill's greedy answer is decoded once per question; each setting is then teacher-forced along it
    (one forward of the question, one of the answer): its greedy answer equals the full prefill's exactly when
    every forced position's argmax is the full prefill's token, so no composed answer is decoded. ``failed``
    (setting -> its rows so far for this count): settings whose rows already miss ``target`` over ``total``
    questions are not measured again (stopped early; the row says so)."""
    prefix_ids = torch.cat([cubes[0].anchor_ids[0]] + [c.input_ids[0] for c in cubes]).to(device)[None]
    # the full prefill in two steps, the memory's ids then each question (transformers' own prefix reuse: the same
    # computation up to float rounding), timed as the sum: one long forward per set instead of one per question
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        memory = output_cache(model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1))
    sync(device)
    memory_s = time.perf_counter() - t0
    full = []
    for q in queries:
        tokens, logits, ttft = _greedy(model, copy.deepcopy(memory), q.to(device), answer_tokens, eos, device)
        full.append((tokens, logits, memory_s + ttft))
    del memory
    rows = []
    for setting in settings:
        mode, budget, *rest = setting
        ape = rest[0] if rest else None
        prefix = None
        done = failed.setdefault(setting, []) if failed is not None else []
        for q, (tokens, logits, full_ttft) in zip(queries, full):
            if failed is not None and _fails(done, total, target):
                break  # stopped early: this setting cannot meet the target at this count any more
            q = q.to(device)
            if prefix is None or mode == "query":  # "query" reads the question: one prefill per question
                sync(device)
                t0 = time.perf_counter()
                prefix = prefill(model, cubes, recompute=mode, budget=budget, query_ids=q)
                sync(device)
                prefill_s = time.perf_counter() - t0
            with _adjust(prefix, model, ape, q):
                forced, ttft = _forced(model, copy.deepcopy(prefix.cache), q, tokens, device)
            top1 = forced.argmax(-1) == tokens
            row = {"mode": mode, "budget": budget, "ape": list(ape) if ape else None, "kl": _kl(logits, forced),
                   "same": bool(top1.all()), "top1_agreement": float(top1.float().mean()),
                   "ttft_s": prefill_s + ttft, "full_ttft_s": full_ttft, "recomputed": prefix.recomputed,
                   "tokens": prefix.num_tokens}
            rows.append(row)
            done.append(row)
    return rows


def _summarise(n_cubes: int, per_question: list[dict], settings, total: int) -> list[dict]:
    out = []
    for setting in settings:
        mode, budget, *rest = setting
        ape = list(rest[0]) if rest and rest[0] else None
        rows = [r for r in per_question if r["mode"] == mode and r["budget"] == budget and r["ape"] == ape]
        ttft, full = statistics.median(r["ttft_s"] for r in rows), statistics.median(r["full_ttft_s"] for r in rows)
        out.append({"cubes": n_cubes, "mode": mode, "budget": budget, "ape": ape, "label": setting_label(setting),
                    "kl_mean": statistics.fmean(r["kl"] for r in rows), "kl_max": max(r["kl"] for r in rows),
                    "agreement": statistics.fmean(r["same"] for r in rows),
                    "top1_agreement": statistics.fmean(r["top1_agreement"] for r in rows),
                    "ttft_s": ttft, "full_ttft_s": full, "ttft_saving": 1 - ttft / full if full else 0.0,
                    "recomputed_tokens": statistics.median(r["recomputed"] for r in rows),
                    "prefix_tokens": statistics.median(r["tokens"] for r in rows), "questions": len(rows),
                    # fewer questions than the count's: stopped once it could no longer meet the target
                    "stopped_early": len(rows) < total})
    return out


def read_cases(path) -> list[tuple[list[str], list[str]]]:
    """The cube sets of a JSON file, for ``calibrate(cases=...)``: ``[{"documents": [str, ...], "questions": [str,
    ...]}, ...]``, one cube per document (in order, at least 2), questions whose evidence is in them. Returns
    [(documents, questions)]; a missing, unreadable or malformed file is a CubeError saying where and how to fix."""
    path = Path(path)
    shape = ('[{"documents": ["first text", "second text"], "questions": ["a question about them"]}, ...]')
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CubeError(f"cases file {path} does not exist: pass a JSON file like {shape}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CubeError(f"cannot read cases file {path} ({exc}): pass a UTF-8 JSON file like {shape}") from None
    except ValueError as exc:
        raise CubeError(f"cases file {path} is not JSON ({exc}): write it like {shape}") from None
    if not isinstance(data, list) or not data:
        raise CubeError(f"cases file {path} must hold a non-empty JSON list of cube sets, like {shape}")
    cases = []
    for i, case in enumerate(data):
        if not isinstance(case, dict) or set(case) != {"documents", "questions"}:
            raise CubeError(f"cases file {path}, set {i}: must be an object with exactly the keys \"documents\" and "
                            f"\"questions\", like {shape}")
        for key, least in (("documents", 2), ("questions", 1)):
            value = case[key]
            if not isinstance(value, list) or len(value) < least or not all(
                    isinstance(t, str) and t.strip() for t in value):
                why = " (one cube each; one cube is exact, so nothing to measure)" if least > 1 else ""
                raise CubeError(f"cases file {path}, set {i}: \"{key}\" must be a list of at least {least} non-empty "
                                f"strings{why}")
        cases.append((list(case["documents"]), list(case["questions"])))
    return cases


def calibrate(model, tokenizer, *, texts: list[str] | None = None, cubes=(2, 4, 8), settings=DEFAULT_SETTINGS,
              tokens_per_cube: int = 384, sets: int = 2, questions: int = 3, answer_tokens: int = 12,
              anchor: str | None = None, folder=None, target: Target = DEFAULT_TARGET, save: bool = True,
              seed: int = 0, progress: bool = True, cases: list | None = None, stop_early: bool = True) -> dict:
    """Measure composed vs full prefill on ``model`` and save the calibration the composition gate reads.

    Args:
        model, tokenizer: the transformers model (in the dtype you serve it in) and its tokenizer.
        texts: documents to compose, one cube each (split them where you would: by document, by chat session);
            None: invented multi-paragraph team notes of ``tokens_per_cube`` tokens each (set s of a smaller
            count is the first cubes of set s of the largest). Questions are generic for your texts and about a
            later cube's facts (some spanning two cubes) for the invented ones.
        cubes: the cube counts to measure (the gate uses the smallest measured count >= a request's).
        settings: (mode, budget) pairs of `kvmem.prefill` to measure, or (mode, budget, (temperature, scale,
            decode)) with the APE adjustment (`kvmem.inject.prefill.Prefix.adjusted`; `APE_SETTINGS`), which the
            gate reports but never picks.
        sets, questions: cube sets per count, questions per set (agreement has 1/(sets*questions) resolution).
        answer_tokens: length of the greedy answer compared (KL is teacher-forced along the full prefill's).
        anchor: the text every cube continues; pass ``kvmem.wrap(model, tokenizer).anchor`` to calibrate the chat
            layout `MemoryModel` uses (the CLI does). None: the tokenizer's own sequence start.
        folder: where ``calibration/<fingerprint>-<dtype>.json`` goes (None: $KVMEM_CACHE or ~/.cache/kvmem).
        target: the fidelity the summary's per-count choice reports against.
        save: write the file (False: only return the document).
        cases: instead of ``texts``: explicit cube sets with their own questions, ``[(documents, questions)]``
            (one cube per document, in order; questions whose evidence is in them, e.g. across two of them);
            the counts measured are the sets' lengths (``cubes``, ``sets`` and ``questions`` are then unused).
        stop_early: stop measuring a setting at a count once its questions so far miss ``target`` whatever the
            rest would measure (its row then says ``stopped_early`` and averages the questions measured), and
            skip a count's remaining sets once every setting has stopped; the gate's choice is the same, the
            calibration faster. False: every setting on every question (the bench).

    Returns:
        The calibration document: {"version", "fingerprint", "dtype", "model", "created", "target", "rows": [one
        per count and setting: cubes, mode, budget, kl_mean, kl_max, agreement, top1_agreement, ttft_s,
        full_ttft_s, ttft_saving, ...], "choices": {count: the gate's choice}, "path"}.
    """
    if cases is not None:
        if texts is not None:
            raise CubeError("pass texts or cases, not both")
        if not cases or not all(isinstance(c, (tuple, list)) and len(c) == 2 and c[0] and c[1] and
                                all(isinstance(t, str) and t.strip() for t in list(c[0]) + list(c[1])) for c in cases):
            raise CubeError("cases is a non-empty list of (documents, questions): both non-empty lists of non-empty "
                            "strings")
        cubes = {len(c[0]) for c in cases}
    counts = sorted({int(n) for n in cubes})
    if not counts or counts[0] < 2:
        raise CubeError(f"cubes lists cube counts >= 2 to measure (one cube is exact), got {cubes!r}")
    if texts is not None and (not texts or not all(isinstance(t, str) and t.strip() for t in texts)):
        raise CubeError("texts must be a non-empty list of non-empty strings (one document per cube)")
    if texts is not None and len(texts) < counts[-1]:
        raise CubeError(f"composing {counts[-1]} cubes needs at least {counts[-1]} texts, got {len(texts)}: pass more "
                        f"texts or smaller counts (cubes=...)")
    rng = random.Random(seed)
    _, device = dtype_device(model)
    # where generate(do_sample=False) would stop: the generation config's EOS, else the tokenizer's
    eos = _eos_ids(model) or ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    fields = fingerprint_fields(model, tokenizer)
    given: dict[str, MemCube] = {}  # cubes by text: a document in several sets is encoded once

    def _cubes(docs: list[str]) -> list[MemCube]:
        return [given.get(t) or given.setdefault(t, MemCube.from_text(model, tokenizer, t, anchor=anchor,
                                                                      progress=False)) for t in docs]

    invented: dict[int, list] = {}  # set -> invented documents of the largest count
    per_count = []
    bar = tqdm(total=len(counts) * sets if cases is None else len(cases), desc="kvmem: calibrate", unit="set",
               disable=not progress)
    with eval_mode(model):
        for n in counts:
            per_question, failed = [], {} if stop_early else None
            total = sets * questions if cases is None else sum(len(c[1]) for c in cases if len(c[0]) == n)
            for s in range(sets if cases is None else 0):
                if texts is None:
                    # set s of every count is the first n documents of one set of the largest count: each
                    # document is encoded once (a cube does not depend on what it is later composed with)
                    if s not in invented:
                        invented[s] = invented_documents(tokenizer, counts[-1], tokens_per_cube, seed=seed * 1000 + s)
                    docs = [t for t, _ in invented[s][:n]]
                    qs = invented_questions([f for _, f in invented[s][:n]], rng, questions)
                else:
                    start = (s * n) % len(texts)
                    docs = [texts[(start + i) % len(texts)] for i in range(n)]
                    qs = ["What is the last document about?", "Summarise the first document in one sentence.",
                          "Which details do the documents above share?"][:questions] * (1 + questions // 3)
                    qs = qs[:questions]
                if not _all_fail(failed, settings, total, target):  # else: nothing left to measure at this count
                    per_question += _measure_set(model, _cubes(docs), [query_ids(tokenizer, q) for q in qs], settings,
                                                 answer_tokens=answer_tokens, device=device, eos=eos, failed=failed,
                                                 total=total, target=target)
                bar.update(1)
            for docs, qs in (c for c in cases or () if len(c[0]) == n):
                if not _all_fail(failed, settings, total, target):
                    per_question += _measure_set(model, _cubes(docs), [query_ids(tokenizer, q) for q in qs], settings,
                                                 answer_tokens=answer_tokens, device=device, eos=eos, failed=failed,
                                                 total=total, target=target)
                bar.update(1)
            per_count += _summarise(n, per_question, settings, total)
    bar.close()
    dtype, _ = dtype_device(model)
    doc = {"version": CALIBRATION_VERSION, "fingerprint": fingerprint_id(fields),
           "dtype": str(dtype).removeprefix("torch."), "model": getattr(model.config, "_name_or_path", "") or
           type(model).__name__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "texts": "given cases" if cases is not None else "given" if texts is not None else
           f"invented team notes, {tokens_per_cube} tokens per cube",
           "anchor_tokens": len(tokenizer(anchor, add_special_tokens=False).input_ids) if anchor else 0,
           "answer_tokens": answer_tokens, "target": {"kl": target.kl, "agreement": target.agreement},
           "rows": per_count}
    doc["choices"] = {str(n): choose(doc, n, target=target).__dict__ for n in counts}
    path = calibration_path(model, folder=folder, fields=fields)
    if save:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)  # atomic: prefill never reads half a file
    doc["path"] = str(path)
    return doc

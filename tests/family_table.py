"""Render README.md's model-family table from the family matrix's results (tests/test_families.py).

    KVMEM_FAMILY_RESULTS=/tmp/families.json python -m pytest -q tests/test_families.py
    python tests/family_table.py /tmp/families.json            # rewrites README.md between the markers

Only the text between ``<!-- families:start -->`` and ``<!-- families:end -->`` is ever rewritten.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

START, END = "<!-- families:start -->", "<!-- families:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"
_KINDS = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "chunked"}


def _layers(kinds: list[str]) -> str:
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[_KINDS.get(kind, kind)] = counts.get(_KINDS.get(kind, kind), 0) + 1
    return " + ".join(f"{n} {kind}" for kind, n in counts.items())


def _rope(facts: dict) -> str:
    if "refused" in facts:
        return "not movable"
    parts = [facts["layout"] if facts["layout"] == "interleaved" else "NeoX"]
    if facts["rotary_dim"] < facts["head_dim"]:
        parts.append(f"partial ({facts['rotary_dim']}/{facts['head_dim']} dims)")
    if facts.get("nope"):
        parts.append("NoPE layer " + ", ".join(map(str, facts["nope"])))
    if facts.get("rotated_slot") == "values":
        parts.append("rotated part cached as values (MLA)")
    return ", ".join(parts)


def _worst(cases: dict, check: str, dtype: str = "float32") -> str:
    """'exact (<= worst diff)' over the cases in ``dtype``, or the first outcome that is not exact."""
    diffs, other = [], None
    for outcome in (c.get(check) for name, c in cases.items() if name.endswith("/" + dtype)):
        if outcome is None:
            continue
        m = re.match(r"exact \(([0-9.e+-]+)", outcome)
        if m:
            diffs.append(float(m.group(1)))
        elif other is None:
            other = outcome
    if other is not None:
        return other
    return f"exact (≤ {max(diffs):.0e})" if diffs else "not run"


def _short(outcome: str) -> str:
    return outcome.split("; pure")[0] + (")" if "; pure" in outcome else "")


def _bf16(cases: dict) -> str:
    if not any(name.endswith("/bfloat16") for name in cases):
        return "not run"
    single, compose = _worst(cases, "single", "bfloat16"), _worst(cases, "compose", "bfloat16")
    return f"{_short(single)} / {_short(compose)}"


def _reason(text: str) -> str:
    m = re.search(r"model: (.*?)\. No re-rotation", text) or re.search(r"model: (.*?);", text)
    return "refused: " + (m.group(1) if m else text[:120])


def render(results: dict) -> str:
    families, facts = results["families"], results["facts"]
    rows = ["| family | layers (tiny test model) | RoPE as measured | one cube (float32) | save → load | several "
            "cubes, full recompute budget (float32) | bfloat16: one cube / several | attention |",
            "|---|---|---|---|---|---|---|---|"]
    exact = 0
    for family in sorted(families):
        cases, fact = families[family], facts.get(family, {})
        compose = _worst(cases, "compose")
        if compose.startswith("refused"):
            compose = _reason(compose[len("refused: "):])
        else:
            exact += compose.startswith("exact")
        trips = {c.get("round_trip") for c in cases.values()}
        rows.append(f"| {fact.get('model_type', family)} | {_layers(fact.get('layers', []))} | {_rope(fact)} | "
                    f"{_worst(cases, 'single')} | {'identical' if trips == {'identical'} else ', '.join(trips)} | "
                    f"{_short(compose)} | {_bf16(cases)} | {', '.join(sorted({c.split('/')[0] for c in cases}))} |")
    head = (f"{exact} of {len(families)} families compose exactly with a full recompute budget; the rest are refused "
            f"with the reason shown, never silently wrong. transformers {results['transformers']}, random 4-layer "
            f"models, sliding windows / chunks of {results['window']} tokens with every memory longer than that. "
            "Differences are the largest |logit| difference to a full prefill (float32) or to transformers' own "
            "prefix reuse (bfloat16: one cube is bit-identical to it; a recompute forward over a subset of the tokens "
            "rounds within a few bf16 ulps of it). In float32 one cube is exact to a few ulps; in "
            "bfloat16/float16 it equals transformers' own two-step prefill, so greedy tokens can differ from a "
            "one-pass prefill exactly as transformers' own cache reuse does. Dynamic-NTK and longrope RoPE (not "
            "in the table) warn that one cube is not exact past `original_max_position_embeddings` and refuse "
            "several cubes. Regenerate: `KVMEM_FAMILY_RESULTS=f.json pytest tests/test_families.py && "
            "python tests/family_table.py f.json`.")
    return head + "\n\n" + "\n".join(rows)


def write_readme(text: str, readme: Path = README) -> None:
    """Replace only what lies between the family markers in ``readme``."""
    content = readme.read_text()
    i, j = content.index(START) + len(START), content.index(END)
    readme.write_text(content[:i] + "\n" + text + "\n" + content[j:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the JSON the family matrix wrote (KVMEM_FAMILY_RESULTS)")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--print", action="store_true", help="print the table instead of writing README.md")
    args = parser.parse_args()
    text = render(json.loads(args.results.read_text()))
    if args.print:
        print(text)
    else:
        write_readme(text, args.readme)


if __name__ == "__main__":
    main()

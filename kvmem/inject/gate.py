"""The composition gate: read a model's calibration (`kvmem.calibrate`) and pick how to compose N cubes.

Several cubes are an approximation whose drift from a full prefill depends on the model: a setting that is fine
on one model garbles another. `kvmem.calibrate` measures, per model, each composition setting's next-token KL and
greedy agreement against a full prefill; `choose` takes the cheapest measured setting that meets a fidelity
target, and "text" (every later cube's tokens recomputed: the same computation as prefilling their text, exact)
where none does. Without a calibration the gate keeps prefill's default mode and says so once per model.

A calibration file is JSON, one per model fingerprint and dtype:
``$KVMEM_CACHE/calibration/<fingerprint>-<dtype>.json`` (else ``~/.cache/kvmem/calibration/...``).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..cubes.fingerprint import fingerprint_fields, fingerprint_id
from ..errors import CubeError
from ..model.devices import dtype_device

CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class Target:
    """The fidelity a composed prefix must reach: mean next-token KL (nats, teacher-forced along the full prefill's
    greedy answer) at most ``kl`` and the full prefill's greedy answer reproduced in at least ``agreement`` of the
    calibration questions."""

    kl: float = 0.05
    agreement: float = 0.9

    def met_by(self, row: dict) -> bool:
        return row["kl_mean"] <= self.kl and row["agreement"] >= self.agreement


DEFAULT_TARGET = Target()


@dataclass(frozen=True)
class Choice:
    """How the gate composes: ``mode`` is a `kvmem.prefill` recompute mode or "text" (recompute everything: a
    full prefill's computation), ``budget`` its knob, ``reason`` one line saying why (shown in ``mm.last``)."""

    mode: str
    budget: int | float | None
    reason: str
    calibrated: bool = False

    def prefill_args(self, cube_tokens: list[int]) -> tuple[str, int | float | None]:
        """(recompute, budget) for `kvmem.prefill`: "text" recomputes every later cube's tokens ("leading" with a
        budget as long as the longest cube), which gives the KV a full prefill computes."""
        if self.mode == "text":
            return "leading", max(cube_tokens, default=0)
        return self.mode, self.budget


def label(mode: str, budget) -> str:
    """``leading@32``, ``selective@0.15``, ``none``, ``text``."""
    return mode if budget is None else f"{mode}@{budget:g}"


def calibration_folder(folder=None) -> Path:
    """Where calibrations live: ``folder`` if given (e.g. a store's folder), else $KVMEM_CACHE or ~/.cache/kvmem."""
    if folder is not None:
        return Path(folder) / "calibration"
    return Path(os.environ.get("KVMEM_CACHE") or Path.home() / ".cache" / "kvmem") / "calibration"


def calibration_key(model, *, fields: dict | None = None, dtype=None) -> str:
    """``<fingerprint>-<dtype>``: the calibration of these weights in this dtype (fidelity differs by dtype).
    ``model`` may be None where ``fields`` and ``dtype`` are given (a serving engine holds no transformers model)."""
    fields = fingerprint_fields(model) if fields is None else fields
    dtype = dtype_device(model)[0] if dtype is None else dtype
    return f"{fingerprint_id(fields)}-{str(dtype).removeprefix('torch.')}"


def calibration_path(model, *, folder=None, fields: dict | None = None, dtype=None) -> Path:
    return calibration_folder(folder) / f"{calibration_key(model, fields=fields, dtype=dtype)}.json"


_LOADED: dict[Path, tuple[float, dict]] = {}


def read_calibration(path) -> dict:
    """The calibration JSON at ``path``, checked; cached until the file changes."""
    path = Path(path)
    mtime = path.stat().st_mtime
    cached = _LOADED.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CubeError(f"calibration {path} is unreadable ({exc}): delete it and run `kvmem calibrate` again") from exc
    if not isinstance(doc, dict) or doc.get("version") != CALIBRATION_VERSION or not isinstance(doc.get("rows"), list):
        raise CubeError(f"calibration {path} is not a kvmem calibration of version {CALIBRATION_VERSION}: delete it "
                        "and run `kvmem calibrate` again")
    _LOADED[path] = (mtime, doc)
    return doc


def load_calibration(model, *, folder=None, fields: dict | None = None, dtype=None) -> dict | None:
    """This model's calibration (its fingerprint and dtype), or None when it has none."""
    path = calibration_path(model, folder=folder, fields=fields, dtype=dtype)
    return read_calibration(path) if path.is_file() else None


def choose(calibration: dict, n_cubes: int, *, target: Target = DEFAULT_TARGET, modes=None) -> Choice:
    """The cheapest (lowest measured TTFT) setting meeting ``target`` at the smallest calibrated cube count
    >= ``n_cubes`` (drift grows with the count); "text" where none meets it or the count was never measured.
    ``modes``: only these recompute modes are possible (a serving engine can only splice: ``("none",)``)."""
    counts = sorted({row["cubes"] for row in calibration["rows"]})
    at = next((n for n in counts if n >= n_cubes), None)
    if at is None:
        return Choice("text", None, f"calibrated up to {max(counts, default=0)} cubes, not {n_cubes}: prefilled as "
                      "text (exact); calibrate with more cubes (kvmem calibrate --cubes ...) to compose", True)
    # rows measured with the APE attention adjustment are reported, never picked: it lives in generate, not prefill
    rows = [r for r in calibration["rows"] if r["cubes"] == at and (modes is None or r["mode"] in modes)
            and not r.get("ape")]
    # a row stopped early (kvmem.calibrate(stop_early=True)) already missed the target on part of the questions
    candidates = [r for r in rows if not r.get("stopped_early")]
    # a setting that meets the target but costs a full prefill's time or more saves nothing over text: not chosen
    passing = sorted((r for r in candidates if target.met_by(r) and r["ttft_saving"] > 0), key=lambda r: r["ttft_s"])
    if passing:
        r = passing[0]
        return Choice(r["mode"], r["budget"], f"calibrated: at {at} cubes {label(r['mode'], r['budget'])} measured KL "
                      f"{r['kl_mean']:.3f} <= {target.kl:g} and greedy agreement {r['agreement']:.0%} >= "
                      f"{target.agreement:.0%} at {r['ttft_saving']:.0%} less TTFT than a full prefill "
                      "(the cheapest setting meeting the target)", True)
    best = min(rows, key=lambda r: (r["kl_mean"], -r["agreement"]), default=None)
    why = ("nothing measured" if best is None else
           f"best {label(best['mode'], best['budget'])}: KL {best['kl_mean']:.3f} (target <= {target.kl:g}), "
           f"agreement {best['agreement']:.0%} (target >= {target.agreement:.0%}), TTFT saved "
           f"{best['ttft_saving']:.0%}")
    return Choice("text", None, f"calibrated: no composition meets the target faster than a full prefill at {at} "
                  f"cubes on this model ({why}): prefilled as text (exact)", True)


_NOTICED: set[str] = set()


def gate(model, n_cubes: int, *, default: tuple[str, int | float | None], fields: dict | None = None,
         folder=None, target: Target = DEFAULT_TARGET) -> Choice:
    """The composition for ``n_cubes`` cubes on ``model``: its calibration's choice, else ``default`` (prefill's
    mode and budget) with a one-time notice per model that the composition is unmeasured."""
    fields = fingerprint_fields(model) if fields is None else fields
    calibration = load_calibration(model, folder=folder, fields=fields)
    if calibration is not None:
        return choose(calibration, n_cubes, target=target)
    key = calibration_key(model, fields=fields)
    mode, budget = default
    if key not in _NOTICED:
        _NOTICED.add(key)
        warnings.warn(f"kvmem: composing several cubes on a model without a calibration ({key}): using "
                      f"{label(mode, budget)}, whose drift from a full prefill is unmeasured for this model; run "
                      "`kvmem calibrate --model ...` (or kvmem.calibrate(model, tokenizer)) once to measure it and "
                      "let prefill pick the cheapest setting that answers like a full prefill", stacklevel=3)
    return Choice(mode, budget, f"uncalibrated: {label(mode, budget)} (prefill's default; run kvmem calibrate)")

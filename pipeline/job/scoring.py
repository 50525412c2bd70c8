"""Scoring: each fill against what the policy removed (`target`), so that a run says how good
its answers are whenever the right ones are known (schemas/README.md, "Scores").

Both strings are normalised first: surrounding whitespace stripped, every internal run of
whitespace collapsed to one space. A blank is an exact match when the normalised strings are
equal. Token F1 is SQuAD's F1 over the multisets of the policies' word units (`policies.WORD`:
runs of non-space characters, every CJK character a word of its own, so Chinese is scored per
character); both empty is 1.0, one empty 0.0. A row is an exact match when every blank is, and
its token F1 is the mean of its blanks'.

A part's commit record carries only sums per mask kind (`quality_sums`), so it stays small
whatever the unit's size; the manifest adds the sums of all parts, earlier runs' included, and
turns them into rates (`quality_totals`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.glm.tokenization import GMASK, MASK, SMASK
from pipeline.job.policies import WORD

SCORE_COLUMNS = ("blank_exact_match", "blank_token_f1", "exact_match", "token_f1")
QUALITY_COLUMNS = ("fills", *SCORE_COLUMNS)  # what `quality_sums` reads of a part
ROWS = "rows"  # the quality entry of whole rows, beside one per mask kind
KIND_ORDER = (MASK, SMASK, GMASK, ROWS)

Sums = dict[str, dict[str, float]]  # kind -> {"count", "exact", "f1_sum"}


def normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(answer: str, target: str) -> bool:
    return normalise(answer) == normalise(target)


def token_f1(answer: str, target: str) -> float:
    """SQuAD F1 over word units: the harmonic mean of the shared tokens' precision and recall."""
    answer_tokens, target_tokens = WORD.findall(answer), WORD.findall(target)
    if not answer_tokens or not target_tokens:
        return float(answer_tokens == target_tokens)
    shared = sum((Counter(answer_tokens) & Counter(target_tokens)).values())
    if not shared:
        return 0.0
    precision, recall = shared / len(answer_tokens), shared / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


def score_columns(answers: list[str], target: list[str] | None) -> dict[str, Any]:
    """A filled row's score columns; all None without a target, or when the prompt's blanks
    and the target's entries differ in number (the input itself held mask tokens), since then
    no fill is known to answer a given target."""
    if not target or len(answers) != len(target):
        return dict.fromkeys(SCORE_COLUMNS)
    exact = [exact_match(a, t) for a, t in zip(answers, target, strict=True)]
    f1 = [token_f1(a, t) for a, t in zip(answers, target, strict=True)]
    return {"blank_exact_match": exact, "blank_token_f1": f1, "exact_match": all(exact),
            "token_f1": sum(f1) / len(f1)}


def _add(sums: Sums, kind: str, exact: bool, f1: float) -> None:
    entry = sums.setdefault(kind, {"count": 0, "exact": 0, "f1_sum": 0.0})
    entry["count"] += 1
    entry["exact"] += int(exact)
    entry["f1_sum"] += f1


def quality_sums(table: pa.Table) -> Sums:
    """The scored rows of a part, summed per mask kind (blanks) and over whole rows."""
    sums: Sums = {}
    scored = table.select(QUALITY_COLUMNS).filter(pc.is_valid(table.column("exact_match")))
    for row in scored.to_pylist():
        for fill, exact, f1 in zip(row["fills"], row["blank_exact_match"], row["blank_token_f1"],
                                   strict=True):
            _add(sums, fill["mask"], exact, f1)
        _add(sums, ROWS, row["exact_match"], row["token_f1"])
    return sums


def _rates(kind: str, entry: Counter) -> dict[str, Any]:
    count = entry["count"]
    return {"scored" if kind == ROWS else "blanks": count, "exact": entry["exact"],
            "exact_match": round(entry["exact"] / count, 6),
            "token_f1": round(entry["f1_sum"] / count, 6)}


def quality_totals(parts: Iterable[Sums]) -> dict[str, dict[str, Any]]:
    """The manifest's `quality`: the parts' sums added up, as counts and rates; only the kinds
    that occurred, in the order [MASK], [sMASK], [gMASK], rows ({} when nothing was scored)."""
    merged: dict[str, Counter] = {}
    for sums in parts:
        for kind, entry in sums.items():
            merged.setdefault(kind, Counter()).update(entry)
    return {kind: _rates(kind, merged[kind]) for kind in sorted(merged, key=KIND_ORDER.index)}
